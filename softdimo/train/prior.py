"""Training stage: the layout prior of a one-step generator with a layout latent (softdimo/layout_prior.py).

The latent stage's encoder maps each of the world's images to a posterior over the latent. The prior's components
are the posteriors of `components` images drawn once; their weights, read from the conditioning, are fitted by
maximum likelihood to the posterior means of fresh images of each prompt, the encoder and generator left as they
are. Means rather than draws of the posteriors: a posterior's spread also covers directions the generator does
not read; how far a draw strays from a component's mean is `GeneratorSettings.latent_scale`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from softdimo.conditioning import Conditioner
from softdimo.generator import OneStepGenerator
from softdimo.layout_prior import LayoutPrior, LayoutPriorConfig, small_body
from softdimo.train import loop
from softdimo.train.latent import LayoutEncoder
from softdimo.train.teacher import training_batch
from softdimo.vq import VQTokenizer


@dataclass(frozen=True)
class PriorNetwork:
    components: int = 1024
    width: int = 128
    depth: int = 2
    heads: int = 4


@dataclass(frozen=True)
class PriorTraining:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 500
    eval_prompts: int = 100
    placement: str = "grid"  # where the world's objects sit (shapes.PLACEMENTS)


def train_prior(
    *, run_dir: Path, generator: OneStepGenerator, encoder: LayoutEncoder, tokenizer: VQTokenizer, conditioner: Conditioner,
    network: PriorNetwork, training: PriorTraining, device: torch.device,
) -> OneStepGenerator:  # fmt: skip
    """The generator, unchanged, with a layout prior fitted to `encoder`'s posterior means."""
    torch.manual_seed(training.seed)
    body = small_body(generator.cfg, width=network.width, depth=network.depth, heads=network.heads, tokens=1)
    prior = LayoutPrior(LayoutPriorConfig(body=body, latent_dim=generator.cfg.latent_dim, components=network.components)).to(device)
    generator = OneStepGenerator(generator.model.to(device).eval(), generator.settings, prior)
    encoder = encoder.to(device).eval().requires_grad_(False)
    tokenizer = tokenizer.to(device).eval()
    with torch.no_grad():  # the components: as many encoded images (a run that resumes loads its own)
        tokens, condition = training_batch(
            rng=np.random.default_rng([training.seed, 0, 0]), size=network.components, conditioner=conditioner, tokenizer=tokenizer,
            device=device, placement=training.placement,
        )  # fmt: skip
        means, log_vars = encoder(tokens, condition)
        prior.place(means, 0.5 * log_vars)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=training.lr, betas=(0.9, 0.95), weight_decay=training.weight_decay)
    eval_prompts = loop.training_eval_prompts(training.eval_prompts, conditioner.kinds)

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        rng = np.random.default_rng([training.seed, step])
        tokens, condition = training_batch(
            rng=rng, size=training.batch_size, conditioner=conditioner, tokenizer=tokenizer, device=device, placement=training.placement,
        )  # fmt: skip
        with torch.no_grad():
            means, _ = encoder(tokens, condition)
        nll = -prior.log_likelihood(means, condition).mean() / means.shape[1]
        optimizer.zero_grad(set_to_none=True)
        nll.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        return {"nll_per_dim": nll.item()}

    def eval_fn(step: int) -> dict[str, float]:
        return loop.one_step_metrics(generator, tokenizer, conditioner, eval_prompts)

    loop.run(
        run_dir=run_dir,
        modules={"prior": prior},
        optimizers={"prior": optimizer},
        step_fn=step_fn,
        steps=training.steps,
        eval_fn=eval_fn,
        eval_every=training.eval_every,
        description="layout prior",
    )
    prior.eval()
    return generator
