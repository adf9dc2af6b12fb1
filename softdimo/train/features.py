"""Training stage: the feature network for Fréchet distances, by regressing object counts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from softdimo import shapes
from softdimo.features import FeatureNet, FeatureNetConfig, count_targets
from softdimo.train import loop
from softdimo.vq import to_tensor


@dataclass(frozen=True)
class FeatureTraining:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    seed: int = 0
    placement: str = "grid"  # where the world's objects sit (shapes.PLACEMENTS)


def train_features(run_dir: Path, cfg: FeatureNetConfig, training: FeatureTraining, device: torch.device) -> FeatureNet:
    torch.manual_seed(training.seed)
    net = FeatureNet(cfg).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=training.lr)

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        rng = np.random.default_rng([training.seed, step])
        samples = [shapes.sample(rng, placement=training.placement) for _ in range(training.batch_size)]
        images = to_tensor(np.stack([s.image for s in samples])).to(device)
        targets = count_targets([list(s.objects) for s in samples]).to(device)
        loss = F.mse_loss(net(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    loop.run(
        run_dir=run_dir,
        modules={"features": net},
        optimizers={"features": optimizer},
        step_fn=step_fn,
        steps=training.steps,
        description="feature net",
    )
    return net.eval()
