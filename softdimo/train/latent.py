"""Training stage: a one-step generator with a layout latent, fitted to the world's images as a conditional VAE.

Di[M]O's input noise is independent per token, so a one-step generator must agree across 64 positions on one
layout from 64 unrelated draws. Here the generator also reads one Gaussian vector (TransformerConfig.latent_dim):
an encoder, used only in training, maps each training image to a posterior over that vector, the generator
(initialised from the teacher) learns to draw the image back from a sample of it, and a KL term keeps the
posteriors close to a standard normal. The bundle keeps the encoder: the layout prior the generator is sampled
from is fitted to it next (softdimo/train/prior.py), and a distillation stage goes on from there."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from softdimo.bundle import Bundle, BundleError
from softdimo.conditioning import Conditioner
from softdimo.generator import GeneratorSettings, OneStepGenerator
from softdimo.seeding import ImageNoise
from softdimo.train import loop
from softdimo.train.batches import BatchesAhead, WorldBatch
from softdimo.train.teacher import tokenized
from softdimo.layout_prior import small_body
from softdimo.transformer import MaskedTransformer, TransformerConfig
from softdimo.vq import VQTokenizer


@dataclass(frozen=True)
class LatentTraining:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.01
    kl_weight: float = 1.0  # 1 is the VAE's bound; the reconstruction term is summed over an image's tokens
    encoder_width: int = 128
    encoder_depth: int = 2
    encoder_heads: int = 4
    seed: int = 0
    eval_every: int = 500
    eval_prompts: int = 100
    placement: str = "grid"  # where the world's objects sit (shapes.PLACEMENTS)


class LayoutEncoder(nn.Module):
    """Image tokens and conditioning -> the mean and log-variance of the layout latent, (B, L) each."""

    def __init__(self, body: TransformerConfig, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.body = MaskedTransformer(body)
        self.narrow = nn.Linear(body.width, 8)  # each position's few numbers keep where things are in the readout
        self.readout = nn.Linear(body.tokens * 8, 2 * latent_dim)

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (states,) = self.body.hidden_states(self.body.embed(tokens), condition, (self.body.cfg.depth - 1,))
        mean, log_var = self.readout(self.narrow(states).flatten(1)).chunk(2, dim=-1)
        return mean, log_var.clamp(-10.0, 4.0)

    def config(self) -> dict:
        return {"body": self.body.cfg.to_dict(), "latent_dim": self.latent_dim}


def load_layout_encoder(bundle: Bundle, device: torch.device | str = "cpu") -> LayoutEncoder:
    """The layout encoder a latent stage's bundle keeps beside its generator (the layout prior is fitted to it)."""
    if "encoder" not in bundle.config:
        raise BundleError(f"{bundle.path}: no layout encoder (a bundle of a latent stage keeps one)")
    config = bundle.config["encoder"]
    encoder = LayoutEncoder(TransformerConfig.from_dict(config["body"]), config["latent_dim"])
    encoder.load_state_dict(bundle.weights("encoder"), strict=True)
    return encoder.to(device).eval()


def latent_student(teacher: MaskedTransformer, latent_dim: int) -> MaskedTransformer:
    """The teacher's network with a layout latent input; every weight but the latent's is the teacher's."""
    student = MaskedTransformer(replace(teacher.cfg, latent_dim=latent_dim)).to(next(teacher.parameters()).device)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not key.startswith("latent_input.") for key in missing):
        raise ValueError(
            f"the teacher's weights do not fit its own architecture: missing {missing}, unexpected {unexpected}"
        )
    return student


def train_latent(
    *,
    run_dir: Path,
    teacher: MaskedTransformer,
    tokenizer: VQTokenizer,
    conditioner: Conditioner,
    latent_dim: int,
    generator_settings: GeneratorSettings,
    training: LatentTraining,
    device: torch.device,
) -> tuple[OneStepGenerator, LayoutEncoder]:
    """The generator with its layout latent, and the encoder it was fitted with (a layout prior is fitted to it)."""
    if latent_dim < 1:
        raise ValueError(f"a layout latent needs latent_dim >= 1, got {latent_dim}")
    torch.manual_seed(training.seed)
    student = latent_student(teacher.to(device), latent_dim).train()
    for p in student.input_parameters():  # as in Di[M]O, the embedding tables and positions stay the teacher's
        p.requires_grad_(False)
    body = small_body(
        student.cfg, width=training.encoder_width, depth=training.encoder_depth, heads=training.encoder_heads
    )
    encoder = LayoutEncoder(body, latent_dim).to(device)
    generator = OneStepGenerator(student, generator_settings)
    trainable = [p for p in (*student.parameters(), *encoder.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=training.lr, betas=(0.9, 0.95), weight_decay=training.weight_decay)
    tokenizer = tokenizer.to(device).eval()
    eval_prompts = loop.training_eval_prompts(training.eval_prompts, conditioner.kinds)

    draw = WorldBatch(
        seed=training.seed,
        size=training.batch_size,
        kinds=conditioner.kinds,
        placement=training.placement,
        noise_seeds=True,
    )
    batches = BatchesAhead(draw, training.steps, device)

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        *drawn, noise_seeds = batches(step)
        tokens, condition = tokenized(drawn, conditioner=conditioner, tokenizer=tokenizer, device=device)
        b = tokens.shape[0]
        g = torch.Generator().manual_seed(training.seed * 1_000_003 + step)
        mean, log_var = encoder(tokens, condition)
        latent = mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=g).to(device)
        noise = ImageNoise(noise_seeds, device)
        logits = generator.logits(generator.initial_embeddings(noise, condition, latent=latent), condition)
        reconstruction = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="sum") / b
        kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(-1).mean()
        loss = reconstruction + training.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return {"reconstruction": reconstruction.item(), "kl": kl.item()}

    def eval_fn(step: int) -> dict[str, float]:
        return loop.one_step_metrics(generator, tokenizer, conditioner, eval_prompts)

    loop.run(
        run_dir=run_dir,
        modules={"student": student, "encoder": encoder},
        optimizers={"latent": optimizer},
        step_fn=step_fn,
        steps=training.steps,
        eval_fn=eval_fn,
        eval_every=training.eval_every,
        description="layout latent",
    )
    student.eval()
    return generator, encoder.eval()
