"""Training stage: the masked-diffusion teacher, text- or class-conditional, on tokenized Shapes images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softdimo import shapes
from softdimo.conditioning import Conditioner
from softdimo.sampler import SamplerSettings, mask_counts, mask_ratio, mask_tokens
from softdimo.train import distributed, loop
from softdimo.train.batches import BatchesAhead, WorldBatch
from softdimo.transformer import MaskedTransformer, TransformerConfig
from softdimo.vq import VQTokenizer, to_tensor


@dataclass(frozen=True)
class TeacherTraining:
    """The defaults are the shipped text teacher's training (recipes/shapes-teacher-text.toml)."""

    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    condition_dropout: float = 0.1  # share of examples trained unconditionally, for classifier-free guidance
    label_smoothing: float = 0.1
    schedule: str = "cosine"
    seed: int = 0
    eval_every: int = 500
    eval_prompts: int = 100
    placement: str = "grid"  # where the world's objects sit (shapes.PLACEMENTS)
    # How often each of the conditioner's kinds is drawn, relative to the others; () equally.
    kind_weights: tuple[int, ...] = ()
    position_init: str = "random"  # "grid": image positions start as a 2-D sine-cosine grid (init_grid_positions)

    def __post_init__(self):
        if self.position_init not in ("random", "grid"):
            raise ValueError(f"position_init is random or grid, got {self.position_init!r}")


def training_batch(
    *,
    rng: np.random.Generator,
    size: int,
    conditioner: Conditioner,
    tokenizer: VQTokenizer,
    device: torch.device,
    placement: str = "grid",
    rows: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image tokens (B, N), conditioning) for a fresh batch of Shapes samples; `rows` of it under several processes."""
    drawn = shapes.batch(rng, size, kinds=conditioner.kinds, placement=placement)
    return tokenized(drawn, conditioner=conditioner, tokenizer=tokenizer, device=device, rows=rows)


def tokenized(
    drawn: tuple[np.ndarray, list[str], np.ndarray],
    *,
    conditioner: Conditioner,
    tokenizer: VQTokenizer,
    device: torch.device,
    rows: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drawn samples (images, prompts, labels) -> (image tokens (B, N), conditioning), `rows` of them, on `device`."""
    images, prompts, labels = drawn
    with torch.no_grad():
        tokens = tokenizer.encode(to_tensor(images[rows]).to(device))
    return tokens, conditioner.from_samples(prompts, labels)[rows].to(device)


def masked_prediction_loss(
    model: MaskedTransformer,
    tokens: torch.Tensor,
    condition: torch.Tensor,
    *,
    generator: torch.Generator,
    training: TeacherTraining,
    world: distributed.World = distributed.World(),
    forward: nn.Module | None = None,
) -> torch.Tensor:
    """MaskGIT's objective: mask a schedule-drawn share of tokens, predict them.

    Under several processes `tokens` and `condition` are this rank's rows of the global batch: the random draws
    are made for the whole batch and sliced, and the loss is this rank's share of the global mean, so that the
    gradients DDP averages (`forward` is the DDP-wrapped model) are those of one process on the whole batch."""
    b, n = tokens.shape
    total, rows = b * world.size, world.rows(b * world.size)
    device = tokens.device
    drop = torch.rand(total, generator=generator)[rows].to(device) < training.condition_dropout
    null = model.null_condition(b, device)
    condition = torch.where(drop.view(-1, *([1] * (condition.dim() - 1))), null, condition)
    ratios = mask_ratio(torch.rand(total, generator=generator), training.schedule)
    ratio = ratios[rows].to(device)
    masked, mask = mask_tokens(
        tokens, ratio, torch.rand(total, n, generator=generator)[rows].to(device), model.cfg.mask_id
    )
    logits = (forward or model)(masked, condition)
    if world.size == 1:
        return F.cross_entropy(logits[mask], tokens[mask], label_smoothing=training.label_smoothing)
    summed = F.cross_entropy(logits[mask], tokens[mask], label_smoothing=training.label_smoothing, reduction="sum")
    return summed * world.size / mask_counts(ratios, n).sum()


def train_teacher(
    *,
    run_dir: Path,
    tokenizer: VQTokenizer,
    conditioner: Conditioner,
    cfg: TransformerConfig,
    training: TeacherTraining,
    sampler: SamplerSettings,
    device: torch.device,
) -> MaskedTransformer:
    from softdimo.pipeline import TeacherPipeline

    torch.manual_seed(training.seed)
    world = distributed.current()
    model = MaskedTransformer(cfg)
    if cfg.code_dim:
        model.set_code_vectors(tokenizer.codebook.cpu())
    if training.position_init == "grid":
        model.init_grid_positions()
    model = model.to(device)
    forward = distributed.wrap(model)  # the model itself in one process
    tokenizer = tokenizer.to(device).eval()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=training.lr, betas=(0.9, 0.95), weight_decay=training.weight_decay
    )
    eval_prompts = loop.training_eval_prompts(training.eval_prompts, conditioner.kinds)
    if world.is_main:
        print(f"teacher: {model.num_parameters() / 1e6:.2f}M parameters, {cfg.conditioning}-conditional")

    kinds = shapes.weighted_kinds(conditioner.kinds, training.kind_weights)
    draw = WorldBatch(seed=training.seed, size=training.batch_size, kinds=kinds, placement=training.placement)
    batches = BatchesAhead(draw, training.steps, device)

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        rows = world.rows(training.batch_size)
        tokens, condition = tokenized(
            batches(step), conditioner=conditioner, tokenizer=tokenizer, device=device, rows=rows
        )
        generator = torch.Generator().manual_seed(training.seed * 1_000_003 + step)
        loss = masked_prediction_loss(
            model, tokens, condition, generator=generator, training=training, world=world, forward=forward
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return {"loss": loss.item()}

    def eval_fn(step: int) -> dict[str, float]:
        return loop.held_out_metrics(
            TeacherPipeline(model=model, tokenizer=tokenizer, conditioner=conditioner, sampler=sampler), eval_prompts
        )

    loop.run(
        run_dir=run_dir,
        modules={"transformer": model},
        optimizers={"transformer": optimizer},
        step_fn=step_fn,
        steps=training.steps,
        eval_fn=eval_fn,
        eval_every=training.eval_every,
        description=f"{cfg.conditioning} teacher",
    )
    model.eval()
    return model


def profile_steps(
    *,
    tokenizer: VQTokenizer,
    conditioner: Conditioner,
    cfg: TransformerConfig,
    training: TeacherTraining,
    device: torch.device,
    steps: int = 10,
) -> dict[str, float]:
    """Mean milliseconds per training step by phase (drawing images, tokenizing, forward + backward + update),
    over `steps` steps after two warm-up steps; nothing is written."""
    import time

    model = MaskedTransformer(cfg).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=training.lr, betas=(0.9, 0.95), weight_decay=training.weight_decay
    )
    totals = {"draw_ms": 0.0, "tokenize_ms": 0.0, "model_ms": 0.0}
    for step in range(steps + 2):
        began = time.perf_counter()
        images, prompts, labels = shapes.batch(
            np.random.default_rng(step), training.batch_size, conditioner.kinds, training.placement
        )
        drawn = time.perf_counter()
        with torch.no_grad():
            tokens = tokenizer.encode(to_tensor(images).to(device))
        condition = conditioner.from_samples(prompts, labels).to(device)
        tokenized = time.perf_counter()
        loss = masked_prediction_loss(
            model, tokens, condition, generator=torch.Generator().manual_seed(step), training=training
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
        done = time.perf_counter()
        if step >= 2:
            for key, seconds in zip(totals, (drawn - began, tokenized - drawn, done - tokenized)):
                totals[key] += 1000 * seconds / steps
    return totals | {"steps_per_s": 1000 / sum(totals.values())}
