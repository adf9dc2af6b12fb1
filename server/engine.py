"""The engine: loaded models on one device, and the batch functions the batchers call."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np
import torch

from softdimo.bundle import BundleError, read_bundle
from softdimo.conditioning import Conditioner
from softdimo.device import resolve_device
from softdimo.pipeline import OneStepPipeline, TeacherPipeline, load_pipeline
from softdimo.runtime import Runtime, RuntimeSettings
from softdimo.seeding import request_seeds, seed_at
from softdimo.tteo import TTEOSettings, candidate_seeds
from softdimo.vq import to_uint8

log = logging.getLogger("softdimo.engine")


@dataclass(frozen=True)
class GenerateJob:
    """One request's work: its conditioning (one row), first seed, image count and sampling steps."""

    condition: torch.Tensor
    seed: int
    n: int
    steps: int | None = None

    @property
    def seeds(self) -> list[int]:
        return request_seeds(self.seed, self.n)

    @property
    def key(self) -> int | None:
        return self.steps

    def split(self, k: int) -> tuple[GenerateJob, GenerateJob]:
        """The first k images and the rest, each keeping its own seed."""
        return replace(self, n=k), replace(self, seed=seed_at(self.seed, k), n=self.n - k)


@dataclass(eq=False)
class RefineProgress:
    """A streaming /refine's line to the model thread: each TTEO step's rewards come out on `queue` as
    (step, seeds, rewards); setting `cancelled` stops the request's images at the next step."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def report(self, step: int, seeds: list[int], rewards: list[float]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (step, seeds, rewards))


@dataclass(frozen=True)
class RefineJob:
    """One /refine request's work (or a part of it); requests batch together when their `settings` and reward agree."""

    condition: torch.Tensor
    text: str  # what the reward reads: the prompt, or a class-conditional model's class as a prompt
    seed: int
    n: int
    settings: TTEOSettings
    reward: str
    # Each image's best_of candidate seeds, drawn for the whole request (see `for_request`), so that a request
    # run in parts, or a batch split after running out of memory, starts from the same candidates.
    candidates: tuple[tuple[int, ...], ...]
    progress: RefineProgress | None = None  # a streaming request's step reports and cancellation

    @classmethod
    def for_request(
        cls, *, condition: torch.Tensor, text: str, seed: int, n: int, settings: TTEOSettings, reward: str,
        progress: RefineProgress | None = None,
    ) -> RefineJob:  # fmt: skip
        rows = candidate_seeds(request_seeds(seed, n), settings.best_of)
        return cls(
            condition=condition, text=text, seed=seed, n=n, settings=settings, reward=reward, candidates=tuple(map(tuple, rows)),
            progress=progress,
        )  # fmt: skip

    @property
    def seeds(self) -> list[int]:
        return request_seeds(self.seed, self.n)

    @property
    def key(self) -> tuple:
        return (self.settings, self.reward)

    def split(self, k: int) -> tuple[RefineJob, RefineJob]:
        """The first k images and the rest, each keeping its own seed and candidates."""
        first = replace(self, n=k, candidates=self.candidates[:k])
        return first, replace(self, seed=seed_at(self.seed, k), n=self.n - k, candidates=self.candidates[k:])


@dataclass
class RefinedImage:
    image: np.ndarray
    reward_before: float
    reward_after: float
    candidate_seed: int


@dataclass
class ServedModel:
    """A model the server answers for: its pipeline and what /v1/models says of it."""

    name: str
    kind: str  # "one-step" or "masked-diffusion"
    pipeline: TeacherPipeline | OneStepPipeline
    image_size: int
    defaults: dict = field(default_factory=dict)
    rewards: list[str] = field(default_factory=list)
    runtime: Runtime = field(default_factory=Runtime)  # precision, compiled buckets, pinned copies: all off by default

    @property
    def conditioner(self) -> Conditioner:
        return self.pipeline.conditioner

    @property
    def conditioning(self) -> str:
        return self.conditioner.conditioning

    def card(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "conditioning": self.conditioning, "image_size": self.image_size,
            "classes": self.conditioner.class_names or None, "rewards": self.rewards, "default": self.defaults,
        }  # fmt: skip

    def generate_batch(self, jobs: Sequence[GenerateJob]) -> list[list[np.ndarray]]:
        """All jobs of one batch in one pass (they share `steps`); returns each job's images."""
        condition = torch.cat([job.condition.expand(job.n, *job.condition.shape[1:]) for job in jobs])
        seeds = [s for job in jobs for s in job.seeds]
        images = self.runtime.generate(self.pipeline, condition, seeds, steps=jobs[0].steps)
        return _split(list(images), [job.n for job in jobs])

    def reward_text(self, prompt: str | None, class_label: int | None) -> str:
        return self.conditioner.reward_text(prompt, class_label)

    def refine_batch(self, jobs: Sequence[RefineJob]) -> list[list[RefinedImage]]:
        """TTEO for all jobs of one batch at once (they share settings and reward); each image on its own."""
        condition = torch.cat([job.condition.expand(job.n, *job.condition.shape[1:]) for job in jobs])
        texts = [job.text for job in jobs for _ in range(job.n)]
        candidates = [list(row) for job in jobs for row in job.candidates]  # drawn per request, not per batch
        on_step = _step_reports(jobs) if any(job.progress is not None for job in jobs) else None
        with self.runtime.running(self.pipeline):  # eager: TTEO takes gradients through the network
            refined = self.pipeline.refine(condition, texts, candidates, jobs[0].settings, reward=jobs[0].reward, on_step=on_step)
            images = to_uint8(refined.images)
        before, after = refined.reward_before.tolist(), refined.reward_after.tolist()
        items = [RefinedImage(images[i], before[i], after[i], refined.seeds[i]) for i in range(len(candidates))]
        return _split(items, [job.n for job in jobs])


def _step_reports(jobs: Sequence[RefineJob]):
    """A TTEO step hook: hand each streaming job its images' rewards; keep optimising only uncancelled jobs' images."""

    def on_step(step: int, rewards: torch.Tensor) -> torch.Tensor:
        values = rewards.tolist()
        wanted: list[bool] = []
        for job, part in zip(jobs, _split(values, [job.n for job in jobs])):
            if job.progress is not None:
                job.progress.report(step, job.seeds, part)
            wanted += [job.progress is None or not job.progress.cancelled.is_set()] * job.n
        return torch.tensor(wanted)

    return on_step


Job = TypeVar("Job", GenerateJob, RefineJob)


# How allocators other than CUDA's word running out: MPS and HIP say "out of memory", the CPU allocator
# "can't allocate memory" or "not enough memory", cuBLAS a failed allocation of its workspace.
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory", "cublas_status_alloc_failed")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(words in str(exc).lower() for words in _OUT_OF_MEMORY)


def run_splitting_on_oom(
    run: Callable[[list[Job]], list[list]], jobs: Sequence[Job], *, on_split: Callable[[], None] = lambda: None,
) -> list[list]:  # fmt: skip
    """`run(jobs)`, but a batch that runs out of memory is split into halves by images, run one after the other,
    recursively down to a single image: the batch fails only if one image alone does not fit.

    Every image keeps its seed (and candidates), so the outputs are those of the unsplit batch."""
    outputs: list[list] = [[] for _ in jobs]
    for index, output in _run_pieces(run, list(enumerate(jobs)), on_split):
        outputs[index].extend(output)
    return outputs


def _run_pieces(run, pieces: list[tuple[int, Job]], on_split) -> list[tuple[int, list]]:
    """Outputs of (job index, job or part of it) pieces, paired with the job index."""
    try:
        outputs = run([job for _, job in pieces])
    except Exception as exc:
        if not is_out_of_memory(exc) or sum(job.n for _, job in pieces) == 1:
            raise
        log.warning("a batch of %d images ran out of memory; running it in halves", sum(job.n for _, job in pieces))
    else:
        if len(outputs) != len(pieces):
            raise RuntimeError(f"the model returned {len(outputs)} outputs for {len(pieces)} jobs")
        return [(index, output) for (index, _), output in zip(pieces, outputs)]
    # Outside the except block, so the failed attempt's frames (and the tensors they hold) are already freed.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    on_split()
    first, second = _halves(pieces)
    return _run_pieces(run, first, on_split) + _run_pieces(run, second, on_split)


def _halves(pieces: list[tuple[int, Job]]) -> tuple[list[tuple[int, Job]], list[tuple[int, Job]]]:
    """Two lists of about half the images each, in order; the job across the middle is split in two."""
    half = sum(job.n for _, job in pieces) // 2
    first, second, seen = [], [], 0
    for index, job in pieces:
        if seen + job.n <= half:
            first.append((index, job))
        elif seen >= half:
            second.append((index, job))
        else:
            head, tail = job.split(half - seen)
            first.append((index, head))
            second.append((index, tail))
        seen += job.n
    return first, second


def verify_bundles(paths: Sequence[str | Path]) -> None:
    """Check the bundles to be served, and the bundles they reference, against their manifests.

    Raises BundleError naming the first missing or altered file; a fast pass before a server starts."""
    if not paths:
        raise BundleError("no bundles to serve: give --weights (or SOFTDIMO_WEIGHTS)")
    pending, seen = [Path(p) for p in paths], set()
    while pending:
        path = pending.pop(0).resolve()
        if path in seen:
            continue
        seen.add(path)
        bundle = read_bundle(path)
        references = [bundle.config.get("tokenizer"), *bundle.config.get("rewards", [])]
        pending.extend(bundle.path / ref for ref in references if isinstance(ref, str))


def _split(items: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for count in counts:
        out.append(items[start : start + count])
        start += count
    return out


def load_model(path: str | Path, device: torch.device, runtime: Runtime | None = None) -> ServedModel:
    bundle = read_bundle(path)
    pipeline = load_pipeline(path, device)
    kind = bundle.config["kind"]
    if kind == "masked-diffusion":
        defaults, rewards = {"steps": pipeline.sampler.steps, "guidance": pipeline.sampler.guidance}, []
    else:
        tteo = pipeline.tteo
        defaults = {"refine": {"steps": tteo.steps, "lr": tteo.lr, "best_of": tteo.best_of, "reward": pipeline.default_reward}}
        rewards = list(pipeline.rewards)
    return ServedModel(
        name=bundle.config["name"], kind=kind, pipeline=pipeline, image_size=pipeline.tokenizer.cfg.image_size,
        defaults=defaults, rewards=rewards, runtime=runtime or Runtime(),
    )  # fmt: skip


class Engine:
    """The models of one server process, loaded onto one device."""

    def __init__(self, models: Sequence[ServedModel], device: torch.device):
        if not models:
            raise ValueError("no models to serve: give at least one bundle folder with --weights")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"two bundles share a model name: {names}")
        self.models = {m.name: m for m in models}
        self.default_model = models[0].name
        self.device = device

    @classmethod
    def load(
        cls, paths: Sequence[str], device_name: str, *, runtime: RuntimeSettings = RuntimeSettings(), max_batch_size: int = 1,
    ) -> Engine:  # fmt: skip
        """The bundles at `paths` on the device, run with `runtime` in batches of at most `max_batch_size` images."""
        device = resolve_device(device_name)
        torch.set_grad_enabled(False)
        shared = Runtime(runtime, max_batch_size=max_batch_size)
        models = []
        for path in paths:
            began = time.perf_counter()
            models.append(load_model(path, device, shared))
            log.info("loaded %s from %s on %s in %.2fs", models[-1].name, path, device, time.perf_counter() - began)
        return cls(models, device)

    def warm_up(self, max_batch_size: int) -> None:
        """Run every model at the largest batch (and, compiled, at every bucket: each compiles once, here), so the
        first real request pays no first-call costs."""
        for model in self.models.values():
            began = time.perf_counter()
            prompt, label = ("a red circle", None) if model.conditioning == "text" else (None, 0)
            condition = model.conditioner.request(prompt, label)
            for size in model.runtime.buckets or (max_batch_size,):
                model.generate_batch([GenerateJob(condition=condition, seed=0, n=size)])
            if model.rewards:
                settings = TTEOSettings(steps=1)
                text = model.reward_text(prompt, label)
                job = RefineJob.for_request(condition=condition, text=text, seed=0, n=max_batch_size, settings=settings, reward=model.rewards[0])
                model.refine_batch([job])
            log.info("warmed %s at batch %d in %.2fs", model.name, max_batch_size, time.perf_counter() - began)
