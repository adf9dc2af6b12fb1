"""Training stage: the VQ tokenizer on Shapes images, judged by how many reconstructions pass."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from softdimo import evaluate, shapes
from softdimo.bundle import save_bundle
from softdimo.train import loop
from softdimo.vq import TokenizerConfig, VQTokenizer, to_tensor, to_uint8


@dataclass(frozen=True)
class TokenizerTraining:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    eval_images: int = 200  # held-out reconstructions judged at each evaluation
    eval_every: int = 250


def palette_targets(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, H, W) class index over background + palette."""
    return torch.as_tensor(evaluate.palette_indices(images))


def reconstruction_pass_rate(tokenizer: VQTokenizer, images: np.ndarray, prompts: list[shapes.Prompt], device: torch.device) -> float:
    recon = []
    for i in range(0, len(images), 64):
        x = to_tensor(images[i : i + 64]).to(device)
        recon.extend(to_uint8(tokenizer.decode_indices(tokenizer.encode(x))))
    return evaluate.pass_rates(recon, prompts).overall


def held_out_images(count: int, seed: int) -> tuple[np.ndarray, list[shapes.Prompt]]:
    prompts = evaluate.held_out_prompts(count, seed=seed)
    rng = np.random.default_rng(seed)
    return np.stack([shapes.render(shapes.sample_scene(p, rng)) for p in prompts]), prompts


def train_tokenizer(run_dir: Path, cfg: TokenizerConfig, training: TokenizerTraining, device: torch.device) -> VQTokenizer:
    torch.manual_seed(training.seed)
    tokenizer = VQTokenizer(cfg).to(device)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=training.lr)
    eval_images, eval_prompts = held_out_images(training.eval_images, seed=10_000 + training.seed)

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        images, _, _ = shapes.batch(np.random.default_rng([training.seed, step]), training.batch_size)
        loss = tokenizer.reconstruction_loss(to_tensor(images).to(device), palette_targets(images).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    def eval_fn(step: int) -> dict[str, float]:
        return {"recon_pass": reconstruction_pass_rate(tokenizer, eval_images, eval_prompts, device)}

    loop.run(
        run_dir=run_dir,
        modules={"tokenizer": tokenizer},
        optimizers={"tokenizer": optimizer},
        step_fn=step_fn,
        steps=training.steps,
        eval_fn=eval_fn,
        eval_every=training.eval_every,
        description="tokenizer",
    )
    tokenizer.eval()
    return tokenizer


def export_tokenizer(tokenizer: VQTokenizer, path: Path, training: TokenizerTraining, name: str = "shapes-tokenizer") -> Path:
    config = {"name": name, "kind": "tokenizer", "tokenizer": tokenizer.cfg.to_dict(), "training": asdict(training)}
    return save_bundle(path, config, {"tokenizer": tokenizer.state_dict()})
