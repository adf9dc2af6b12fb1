"""The feature network behind the Fréchet distance: a small CNN trained to count Shapes objects by kind."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from softdimo import shapes


@dataclass(frozen=True)
class FeatureNetConfig:
    channels: tuple[int, ...] = (32, 64, 128)
    features: int = 128  # the width of the layer the Fréchet distance is measured on

    @property
    def targets(self) -> int:
        # counts of each (colour, shape) class, then of each size
        return shapes.NUM_CLASSES + len(shapes.SIZES)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureNetConfig:
        return cls(channels=tuple(d["channels"]), features=d["features"])


class FeatureNet(nn.Module):
    """Images (B, 3, 64, 64) in [0, 1] -> features (B, F); a linear head on them predicts object counts."""

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = 3
        for c in cfg.channels:
            layers += [
                nn.Conv2d(width, c, 3, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
                nn.Conv2d(c, c, 3, stride=2, padding=1),
                nn.SiLU(),
            ]
            width = c
        self.convs = nn.Sequential(*layers)
        side = shapes.CANVAS // 2 ** len(cfg.channels)
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, cfg.features), nn.SiLU())
        self.head = nn.Linear(cfg.features, cfg.targets)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.convs(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def count_targets(objects_per_image: list[list[shapes.ShapeObject]]) -> torch.Tensor:
    """(B, targets) float counts: objects of each class, then objects of each size."""
    sides = list(shapes.SIZES.values())
    out = np.zeros((len(objects_per_image), shapes.NUM_CLASSES + len(sides)), dtype=np.float32)
    for i, objects in enumerate(objects_per_image):
        for o in objects:
            out[i, shapes.class_label(o.color, o.shape)] += 1
            out[i, shapes.NUM_CLASSES + sides.index(o.size)] += 1
    return torch.from_numpy(out)
