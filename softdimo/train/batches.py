"""Training batches drawn ahead, in step order, by worker processes while the model trains on the current one.

On a CPU the model's own arithmetic takes every core, so batches are drawn in the training process. Beside a
GPU, drawing Shapes images (Python and NumPy, one core) can take longer than a small model's whole step, so
worker processes draw the next batches meanwhile. Every batch is a function of its step alone: the batches, and
what is trained on them, do not depend on how many workers drew them or on where a run was resumed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from softdimo import shapes


def worker_count(device: torch.device) -> int:
    """Processes that draw batches ahead: none on a CPU (the model needs its cores), up to 8 beside a GPU."""
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 2))


class WorldBatch:
    """Step -> the world's samples for that step, drawn from the generator seeded by (seed, step): images
    (B, 64, 64, 3) uint8, prompts, labels, and with `noise_seeds` then one seed per sample for its image noise."""

    def __init__(self, *, seed: int, size: int, kinds, placement: str, noise_seeds: bool = False):
        self.seed, self.size, self.kinds, self.placement, self.noise_seeds = (
            seed,
            size,
            tuple(kinds),
            placement,
            noise_seeds,
        )

    def __call__(self, step: int) -> tuple:
        rng = np.random.default_rng([self.seed, step])
        drawn = shapes.batch(rng, self.size, self.kinds, self.placement)
        return (*drawn, rng.integers(0, 2**62, size=self.size).tolist()) if self.noise_seeds else drawn


class _Steps(Dataset):
    def __init__(self, draw: Callable[[int], Any], start: int, stop: int):
        self.draw, self.start, self.stop = draw, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Any:
        return self.draw(self.start + index)


def _unchanged(drawn: Any) -> Any:
    return drawn


class BatchesAhead:
    """`batches(step)` returns `draw(step)`; with workers, steps after it are being drawn meanwhile.

    Steps are asked for in order from wherever training starts (or resumes); asking out of order starts the
    workers again from the step asked for. Workers are spawned, not forked: the training process holds threads
    (CUDA's, torch's pools), and a fork of a threaded process can deadlock."""

    def __init__(
        self,
        draw: Callable[[int], Any],
        stop: int,
        device: torch.device,
        *,
        workers: int | None = None,
        ahead: int = 4,
    ):
        self.draw, self.stop, self.ahead = draw, stop, ahead
        self.workers = worker_count(device) if workers is None else workers
        self._drawn = None
        self._next = -1

    def __call__(self, step: int) -> Any:
        if not self.workers:
            return self.draw(step)
        if step != self._next:
            loader = DataLoader(
                _Steps(self.draw, step, self.stop),
                batch_size=None,
                num_workers=self.workers,
                prefetch_factor=self.ahead,
                collate_fn=_unchanged,
                multiprocessing_context="spawn",
            )
            self._drawn = iter(loader)
        self._next = step + 1
        return next(self._drawn)
