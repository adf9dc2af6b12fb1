"""Per-image random streams: each image draws from its own seeded generator, so batch-mates never matter."""

from __future__ import annotations

from typing import Sequence

import torch

MAX_SEED = 2**63  # seeds are 0 <= seed < 2^63


def seed_at(first: int, offset: int) -> int:
    """The seed `offset` places after `first`, wrapping below MAX_SEED: image i of a request uses seed_at(seed, i),
    so every first seed is usable whatever the request's size, and every image's seed is one a request can name."""
    return (first + offset) % MAX_SEED


def derived_seed(seed: int, index: int) -> int:
    """The `index`-th seed derived from `seed` (index >= 1), below MAX_SEED: SplitMix64's output for the state
    `seed + index * golden`, so the seeds derived from one seed look unrelated to each other and to neighbouring
    seeds. A sweep over seeds 0, 1, 2, … draws no candidate twice (an offset rule such as seed + j would hand seed 1
    the candidates of seed 0)."""
    z = (seed + index * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % MAX_SEED


def request_seeds(first: int, n: int) -> list[int]:
    """The seeds of a request's n images: first, and the n - 1 after it (wrapping below MAX_SEED)."""
    return [seed_at(first, i) for i in range(n)]


class ImageNoise:
    """One torch.Generator per image; draws stack per-image tensors along a new batch dimension."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(seed))
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.generators)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.generators])

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.generators])

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randint(high, shape, generator=g, device=self.device) for g in self.generators])

    def gumbel(self, *shape: int) -> torch.Tensor:
        u = self.rand(*shape).clamp_(1e-20, 1.0)
        return -torch.log((-torch.log(u)).clamp_min(1e-20))

    def permutation_scores(self, n: int) -> torch.Tensor:
        """(B, n) uniform scores; argsort gives an independent random permutation per image."""
        return self.rand(n)
