"""The work a batcher queues and a model runs: a request's images as a job that can be split by images, each
keeping its seed, and the running of a batch of jobs that splits it in halves when it runs out of memory."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Self, Sequence, TypeVar

import numpy as np
import torch

from softdimo.seeding import request_seeds, seed_at
from softdimo.tteo import TTEOSettings, candidate_seeds

log = logging.getLogger("softdimo.engine")


@dataclass(frozen=True, eq=False, kw_only=True)
class ImageRun:
    """A request's `n` images with consecutive seeds, the first `seed` (wrapping below MAX_SEED): what every job
    holds, and splits by images."""

    seed: int
    n: int

    @property
    def seeds(self) -> list[int]:
        return request_seeds(self.seed, self.n)

    def split(self, k: int) -> tuple[Self, Self]:
        """The first k images and the rest, each keeping its own seed."""
        return replace(self, n=k), replace(self, seed=seed_at(self.seed, k), n=self.n - k)


@dataclass(frozen=True, kw_only=True)
class GenerateJob(ImageRun):
    """One request's work: its conditioning (one row), its images and sampling steps."""

    condition: torch.Tensor
    steps: int | None = None

    @property
    def key(self) -> int | None:
        return self.steps


@dataclass(frozen=True, eq=False, kw_only=True)
class EditJob(ImageRun):
    """One /edit request's work: the image (H, W, 3) every one of its images starts from, which tokens each repaints,
    its conditioning (one row), its images and sampling steps; for image-to-image, its strength."""

    image: np.ndarray
    repaint: torch.Tensor  # (n, N) bool: an image's repainted tokens (a strength draws them per seed)
    condition: torch.Tensor
    steps: int | None = None
    strength: float | None = None  # None with a mask; a pipeline's `edit_at_strength` may read more than `repaint`

    @property
    def key(self) -> tuple[int | None, float | None]:
        """A batch shares its sampling steps and its strength (a MUSE teacher's image-to-image starts by it)."""
        return self.steps, self.strength

    def split(self, k: int) -> tuple[Self, Self]:
        """The first k images and the rest, each keeping its own seed and repainted tokens."""
        first, rest = super().split(k)
        return replace(first, repaint=self.repaint[:k]), replace(rest, repaint=self.repaint[k:])


@dataclass(eq=False)
class RefineProgress:
    """A streaming /refine's line to the model thread: each TTEO step's rewards come out on `queue` as
    (step, seeds, rewards); setting `cancelled` stops the request's images at the next step."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def report(self, step: int, seeds: list[int], rewards: list[float]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (step, seeds, rewards))


@dataclass(frozen=True, eq=False, kw_only=True)
class Refinement:
    """TTEO on a job's images (the job's `seeds`): what the reward reads, the settings and the reward; jobs batch
    together when their settings and reward agree."""

    text: str  # what the reward reads: the prompt, or a class-conditional model's class as a prompt
    settings: TTEOSettings
    reward: str
    progress: RefineProgress | None = None  # a streaming request's step reports and cancellation

    @property
    def candidates(self) -> tuple[tuple[int, ...], ...]:
        """Each image's best_of candidate seeds, which depend on the image's seed alone."""
        return tuple(map(tuple, candidate_seeds(self.seeds, self.settings.best_of)))

    @property
    def key(self) -> tuple:
        return (self.settings, self.reward)


@dataclass(frozen=True, kw_only=True)
class RefineJob(ImageRun, Refinement):
    """One /refine request's work (or a part of it): its conditioning (one row), its images and their TTEO."""

    condition: torch.Tensor


@dataclass(frozen=True, eq=False, kw_only=True)
class EditRefineJob(Refinement):
    """An /edit request with `refine`: its edit, and TTEO on it; requests batch together as /refine's do."""

    edit: EditJob

    @property
    def n(self) -> int:
        return self.edit.n

    @property
    def seeds(self) -> list[int]:
        return self.edit.seeds

    def split(self, k: int) -> tuple[Self, Self]:
        """The first k images and the rest, each keeping its own seed and repainted tokens (and so its candidates)."""
        first, rest = self.edit.split(k)
        return replace(self, edit=first), replace(self, edit=rest)


@dataclass
class RefinedImage:
    image: np.ndarray
    reward_before: float
    reward_after: float
    candidate_seed: int


Job = TypeVar("Job", GenerateJob, RefineJob, EditJob, EditRefineJob)


# How allocators other than CUDA's word running out: MPS and HIP say "out of memory", the CPU allocator
# "can't allocate memory" or "not enough memory", cuBLAS a failed allocation of its workspace.
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory", "cublas_status_alloc_failed")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(words in str(exc).lower() for words in _OUT_OF_MEMORY)


def run_splitting_on_oom(
    run: Callable[[list[Job]], list[list]],
    jobs: Sequence[Job],
    *,
    on_split: Callable[[], None] = lambda: None,
) -> list[list]:
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


def split_counts(items: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for count in counts:
        out.append(items[start : start + count])
        start += count
    return out
