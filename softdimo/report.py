"""Evaluation reports: a model's images on held-out prompts, judged, with Fréchet distance and placement spread."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from softdimo import evaluate, shapes
from softdimo.features import FeatureNet
from softdimo.vq import to_tensor

HELD_OUT_SEED = 2026  # prompts no training run draws from
REAL_SEED = 4242  # placements of the reference real images


@dataclass
class Row:
    """One line of an evaluation table."""

    name: str
    rates: evaluate.PassRates
    frechet: float
    spread: float
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "name": self.name, "overall": round(self.rates.overall, 4),
            "per_kind": {k: round(v, 4) for k, v in self.rates.per_kind.items()},
            "failures": self.rates.failures, "frechet": round(self.frechet, 3), "spread": round(self.spread, 2),
            "seconds": round(self.seconds, 1), **self.extra,
        }  # fmt: skip


def real_images(prompts: Sequence[shapes.Prompt], seed: int = REAL_SEED) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [shapes.render(shapes.sample_scene(p, rng)) for p in prompts]


@torch.no_grad()
def feature_vectors(net: FeatureNet, images: Sequence[np.ndarray]) -> np.ndarray:
    out = []
    for i in range(0, len(images), 100):
        out.append(net.features(to_tensor(np.stack(images[i : i + 100])).to(next(net.parameters()).device)).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


class Evaluator:
    """Judges images for a fixed prompt set and compares their features with real images of the same prompts."""

    def __init__(self, prompts: Sequence[shapes.Prompt], features: FeatureNet):
        self.prompts = list(prompts)
        self.features = features
        reference = real_images(self.prompts)
        self.real_features = feature_vectors(features, reference)
        self.real_spread = evaluate.placement_spread(reference)

    def row(self, name: str, images: Sequence[np.ndarray], seconds: float = 0.0, **extra) -> Row:
        return Row(
            name=name,
            rates=evaluate.pass_rates(images, self.prompts),
            frechet=evaluate.frechet_distance(feature_vectors(self.features, images), self.real_features),
            spread=evaluate.placement_spread(images),
            seconds=seconds,
            extra=extra,
        )

    def reference_row(self) -> Row:
        return self.row("real images (reference)", real_images(self.prompts, seed=REAL_SEED + 1))


def markdown_table(rows: Sequence[Row], real_spread: float) -> str:
    kinds = list(rows[0].rates.per_kind)
    header = ["model", *kinds, "overall", "Fréchet", "spread"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.name, *(f"{r.rates.per_kind[k]:.3f}" for k in kinds), f"**{r.rates.overall:.3f}**", f"{r.frechet:.2f}",
                 f"{r.spread:.1f} ({r.spread / real_spread:.0%})"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timed(fn: Callable[[], list[np.ndarray]]) -> tuple[list[np.ndarray], float]:
    import time

    start = time.perf_counter()
    images = fn()
    return images, time.perf_counter() - start
