"""How a pipeline's batches run on their device: bf16 autocast or int8 weights, a compiled network fed fixed batch
buckets (CUDA graphs on CUDA), and images copied back through pinned host memory. Every option is off by default;
each runs on CPU too, with the same outputs (bf16 and int8 within their rounding), except pinning, which needs an
accelerator, and int8, which runs on CPU only."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from softdimo.draw_check import ROUND_SIZE
from softdimo.vq import HOST_COPY

# precision -> the autocast dtype it runs under (None: none). int8 quantises the network's Linear layers dynamically
# (int8 weights, activations quantised per batch) for /generate; TTEO, which needs gradients, stays fp32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "int8": None}


@dataclass(frozen=True)
class RuntimeSettings:
    precision: str = "fp32"  # "bf16": under torch.autocast in bfloat16 (weights stay fp32); "int8": see PRECISIONS
    # torch.compile the network's forward_embeddings for /generate batches, each padded to the next bucket size
    # (powers of two up to the largest batch) so that every compiled shape is reused; on CUDA as CUDA graphs.
    compile: bool = False
    pin_memory: bool = False  # images come back through pinned host memory (on CUDA; elsewhere nothing is pinned)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below the largest batch, and the largest batch itself: (1, 2, 4, 8, 16) for 16."""
    return tuple(
        sorted({1 << k for k in range(max_batch_size.bit_length()) if 1 << k < max_batch_size} | {max_batch_size})
    )


class Runtime:
    """RuntimeSettings applied to the pipelines of one device, whose batches hold at most `max_batch_size` images."""

    def __init__(self, settings: RuntimeSettings = RuntimeSettings(), *, max_batch_size: int = 1):
        self.settings = settings
        self.buckets = bucket_sizes(max_batch_size) if settings.compile else ()
        self._swapped: dict[int, object] = {}  # id(network) -> its int8 and/or compiled forward_embeddings

    def bucket(self, n: int) -> int:
        """The batch size `n` images run at: the next bucket when compiled (past the largest, n itself), else n."""
        return next((size for size in self.buckets if size >= n), n)

    def generate(self, pipeline, condition: torch.Tensor, seeds: Sequence[int], steps: int | None = None) -> np.ndarray:
        """pipeline.generate under these settings. A compiled batch is padded with copies of its last image to its
        bucket and cut back after (and so is each round of a draw check's redraws): every image depends on its own
        seed and conditioning only, so padding changes none."""
        n = len(seeds)
        size = self.bucket(n)
        if size > n:
            condition = torch.cat([condition, condition[-1:].expand(size - n, *condition.shape[1:])])
            seeds = [*seeds, *[seeds[-1]] * (size - n)]
        swaps = self.settings.compile or self.settings.precision == "int8"  # the network /generate runs is another
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.running(pipeline))
            if swaps:
                stack.enter_context(self._swapped_network(pipeline))
            if self.buckets:  # a draw check's rounds of redraws run at bucket sizes too
                token = ROUND_SIZE.set(self.bucket)
                stack.callback(ROUND_SIZE.reset, token)
            images = pipeline.generate(self.to_device(condition, pipeline.device), seeds, steps)
        return images[:n]

    @contextlib.contextmanager
    def running(self, pipeline) -> Iterator[None]:
        """Around any call of `pipeline` (TTEO too, which stays eager): bf16 autocast and pinned copies to host."""
        with contextlib.ExitStack() as stack:
            if PRECISIONS[self.settings.precision] is not None:
                stack.enter_context(
                    torch.autocast(device_type=pipeline.device.type, dtype=PRECISIONS[self.settings.precision])
                )
            if self.settings.pin_memory:
                token = HOST_COPY.set(self.to_host)
                stack.callback(HOST_COPY.reset, token)
            yield

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A host tensor on `device`; with pin_memory on CUDA, staged in pinned memory and copied asynchronously (an
        expanded tensor, whose rows share memory, is laid out row by row first: pinning copies into fresh memory)."""
        if self.settings.pin_memory and device.type == "cuda":
            return tensor.contiguous().pin_memory().to(device, non_blocking=True)
        return tensor.to(device)

    @staticmethod
    def to_host(tensor: torch.Tensor) -> torch.Tensor:
        """A device tensor copied into a fresh host buffer: pinned where there is an accelerator, so the copy is one
        DMA transfer; the buffer goes back to torch's pinned-block cache when the images made from it are dropped."""
        accelerated = tensor.device.type == "cuda"
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=accelerated)
        host.copy_(tensor, non_blocking=accelerated)
        if accelerated:
            torch.cuda.current_stream(tensor.device).synchronize()
        return host

    @contextlib.contextmanager
    def _swapped_network(self, pipeline) -> Iterator[None]:
        """The pipeline's network answers forward_embeddings (every forward pass of the project's networks goes through
        it) with its int8 and/or compiled version for the call; TTEO, which needs gradients, keeps the eager one."""
        network = (pipeline.generator if hasattr(pipeline, "generator") else pipeline).model
        swapped = self._swapped.get(id(network))
        if swapped is None:
            forward = network.forward_embeddings
            if self.settings.precision == "int8":
                if pipeline.device.type != "cpu":
                    raise ValueError("int8 precision runs on CPU: use fp32 or bf16 on an accelerator")
                with (
                    warnings.catch_warnings()
                ):  # torch marks its quantised tensors for a future move; they work as stated
                    warnings.simplefilter("ignore", UserWarning)
                    forward = torch.ao.quantization.quantize_dynamic(
                        network, {torch.nn.Linear}, dtype=torch.qint8
                    ).forward_embeddings
            if self.settings.compile:
                mode = "reduce-overhead" if pipeline.device.type == "cuda" else None  # reduce-overhead: CUDA graphs
                forward = torch.compile(forward, dynamic=False, mode=mode)
            swapped = self._swapped[id(network)] = forward
        network.forward_embeddings = swapped  # an instance attribute shadows the method
        try:
            yield
        finally:
            del network.forward_embeddings
