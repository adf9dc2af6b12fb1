"""Training stage: the VQ tokenizer on Shapes images, judged by how many reconstructions pass."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from softdimo import judge, shapes
from softdimo.train import loop
from softdimo.vq import TokenizerConfig, VQTokenizer, to_tensor, to_uint8


@dataclass(frozen=True)
class TokenizerTraining:
    """The defaults are the shipped tokenizer's training (recipes/shapes-tokenizer.toml)."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    eval_images: int = 200  # held-out reconstructions judged at each evaluation
    eval_every: int = 500
    placement: str = "grid"  # where the world's objects sit (shapes.PLACEMENTS)
    dictionary_images: int = 2000  # images whose patches make a dictionary tokenizer's prototypes
    token_noise: float = 0.1  # a dictionary decoder learns to repair up to this share of random wrong tokens


def palette_targets(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, H, W) class index over background + palette."""
    return torch.as_tensor(judge.palette_indices(images))


def reconstruction_pass_rate(
    tokenizer: VQTokenizer, images: np.ndarray, prompts: list[shapes.Prompt], device: torch.device
) -> float:
    recon = []
    for i in range(0, len(images), 64):
        x = to_tensor(images[i : i + 64]).to(device)
        recon.extend(to_uint8(tokenizer.decode_indices(tokenizer.encode(x))))
    return judge.pass_rates(recon, prompts).overall


def held_out_images(count: int, seed: int, placement: str = "grid") -> tuple[np.ndarray, list[shapes.Prompt]]:
    prompts = judge.held_out_prompts(count, seed=seed)
    return np.stack(shapes.render_prompts(prompts, np.random.default_rng(seed), placement)), prompts


def fit_dictionary(patches: torch.Tensor, size: int, seed: int = 0, iterations: int = 20) -> torch.Tensor:
    """Prototypes (K, P) for patches (M, P): every distinct patch when there are at most `size` of them
    (so encoding is exact), otherwise `size` k-means centres started from the most frequent patches."""
    distinct, counts = patches.unique(dim=0, return_counts=True)
    if len(distinct) <= size:
        return distinct
    centres = distinct[counts.argsort(descending=True)[:size]].clone()
    generator = torch.Generator().manual_seed(seed)
    sample = distinct[torch.randperm(len(distinct), generator=generator)[: 50 * size]]
    for _ in range(iterations):
        nearest = torch.cdist(sample, centres).argmin(-1)
        for k in range(size):
            members = sample[nearest == k]
            if len(members):
                centres[k] = members.mean(0)
    return centres


def dictionary_config(cfg: TokenizerConfig, training: TokenizerTraining) -> tuple[TokenizerConfig, torch.Tensor]:
    """A dictionary tokenizer's config sized to the patches the world draws, and its prototypes."""
    images, _, _ = shapes.batch(
        np.random.default_rng([training.seed, 1 << 20]), training.dictionary_images, placement=training.placement
    )
    patches = image_patches(cfg, to_tensor(images))
    prototypes = fit_dictionary(patches, cfg.dictionary_size, seed=training.seed)
    distinct = len(patches.unique(dim=0))
    print(
        f"tokenizer: {distinct} distinct {cfg.downsample}x{cfg.downsample} patches "
        f"in {training.dictionary_images} images; {len(prototypes)} codes"
    )
    return replace(cfg, dictionary_size=len(prototypes)), prototypes


def image_patches(cfg: TokenizerConfig, images: torch.Tensor) -> torch.Tensor:
    """All patches of images (B, 3, H, W) as rows (B * g*g, 3*p*p), in the dictionary encoder's layout."""
    from softdimo.vq import DictionaryEncoder

    return DictionaryEncoder(cfg).patches(images).flatten(0, 1)


def train_tokenizer(
    run_dir: Path, cfg: TokenizerConfig, training: TokenizerTraining, device: torch.device
) -> VQTokenizer:
    torch.manual_seed(training.seed)
    prototypes = None
    if cfg.encoder == "dictionary":
        cfg, prototypes = dictionary_config(cfg, training)
    tokenizer = VQTokenizer(cfg)
    if prototypes is not None:
        tokenizer.encoder.prototypes.copy_(prototypes)
    tokenizer = tokenizer.to(device)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=training.lr)
    eval_images, eval_prompts = held_out_images(
        training.eval_images, seed=10_000 + training.seed, placement=training.placement
    )

    def corruption(generator: torch.Generator) -> torch.Tensor | None:
        """Replacement codes for a random share (up to token_noise) of each image's tokens, -1 where none."""
        if cfg.encoder != "dictionary" or not training.token_noise:
            return None
        b, n = training.batch_size, cfg.grid**2
        share = torch.rand(b, 1, generator=generator) * training.token_noise
        codes = torch.randint(0, cfg.codebook_size, (b, n), generator=generator)
        return torch.where(torch.rand(b, n, generator=generator) < share, codes, -1).to(device)

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        images, _, _ = shapes.batch(
            np.random.default_rng([training.seed, step]), training.batch_size, placement=training.placement
        )
        noise = corruption(torch.Generator().manual_seed(training.seed * 1_000_003 + step))
        loss = tokenizer.reconstruction_loss(to_tensor(images).to(device), palette_targets(images).to(device), noise)
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
