"""Training stage: Di[M]O distillation of a one-step generator, and Soft-Di[M]O's GAN and reward terms."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softdimo import shapes
from softdimo.conditioning import Conditioner
from softdimo.generator import GeneratorSettings, OneStepGenerator
from softdimo.layout_prior import LayoutPrior
from softdimo.reward import Reward
from softdimo.seeding import ImageNoise
from softdimo.sampler import guided_logits, mask_counts, mask_ratio, mask_tokens
from softdimo.train import distributed, loop
from softdimo.transformer import MaskedTransformer
from softdimo.vq import VQTokenizer, to_tensor


@dataclass(frozen=True)
class DistillTraining:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-4  # generator
    aux_lr: float = 1e-4  # auxiliary model
    warmup: int = 100
    guidance: float = 2.0  # the teacher's classifier-free guidance while distilling
    dimo_weight: float = (
        1.0  # 0 leaves Di[M]O's divergence (and its auxiliary model) out: the GAN and reward terms alone
    )
    beta: float = 0.0  # generalised Jeffreys divergence: (1 - beta) forward KL + beta reverse KL
    schedule: str = "arccos"  # how many generator tokens are re-masked before teacher and auxiliary see them
    aux_label_smoothing: float = 0.1
    ema: float = 0.999
    relaxation: str = "soft"  # differentiable path for GAN and reward: "soft" embeddings or "straight-through" Gumbel
    gan_weight: float = 0.0  # 0 leaves the GAN out
    gan_layers: tuple[int, ...] = (-1,)  # teacher blocks the discriminator heads read; negative counts from the end
    gan_mask_max: float = 0.95  # real and fake inputs are mask-replaced at a ratio drawn from [0, this]
    disc_lr: float = 2e-4
    reward_weight: float = 0.0  # 0 leaves the reward out
    seed: int = 0
    eval_every: int = 250
    eval_prompts: int = 100
    placement: str = "grid"  # where the world's objects sit (shapes.PLACEMENTS)


# ------------------------------------------------------------------ Di[M]O's objective


def jeffreys_logit_gradient(aux_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Gradient of the token-level divergence with respect to the logits, in closed form, per position.

    Forward KL(p_teacher || p_aux) gives p_aux - p_teacher; reverse KL(p_aux || p_teacher) gives
    p_aux * (log p_aux - log p_teacher - KL). Their (1 - beta, beta) mix is Di[M]O's Jeffreys family."""
    log_aux = aux_logits.float().log_softmax(-1)
    log_teacher = teacher_logits.float().log_softmax(-1)
    p_aux = log_aux.exp()
    grad = (1 - beta) * (p_aux - log_teacher.exp())
    if beta:
        diff = log_aux - log_teacher
        reverse_kl = (p_aux * diff).sum(-1, keepdim=True)
        grad = grad + beta * p_aux * (diff - reverse_kl)
    return grad


def surrogate_loss(logits: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0.5 * ||z - stopgrad(z - grad)||^2 over masked positions, / batch: its gradient in z is exactly `grad`."""
    target = (logits - grad).detach()
    return 0.5 * ((logits - target) ** 2 * mask[..., None]).sum() / logits.shape[0]


# ------------------------------------------------------------------ discriminator


class DiscriminatorHeads(nn.Module):
    """Light heads on the frozen teacher's hidden states: per-token scores averaged into one logit per image."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width // 2), nn.SiLU(), nn.Linear(width // 2, 1))
            for _ in range(layers)
        )

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        return sum(head(s).squeeze(-1).mean(-1) for head, s in zip(self.heads, states))  # (B,)


def mask_replace(
    embeddings: torch.Tensor,
    mask_embedding: torch.Tensor,
    max_ratio: float,
    generator: torch.Generator,
    world: distributed.World = distributed.World(),
) -> torch.Tensor:
    """Replace a random share (uniform in [0, max_ratio] per row) of positions by the mask token's embedding.

    Under several processes `embeddings` are this rank's rows: the draws are the global batch's, sliced."""
    b, n, _ = embeddings.shape
    total, rows = b * world.size, world.rows(b * world.size)
    ratio = torch.rand(total, generator=generator)[rows] * max_ratio
    chosen = torch.rand(total, n, generator=generator)[rows] < ratio[:, None]
    return torch.where(chosen[..., None].to(embeddings.device), mask_embedding, embeddings)


def relaxed_tokens(logits: torch.Tensor, relaxation: str, gumbel: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for sampled tokens (B, N, K): softmax probabilities, or straight-through one-hot."""
    probs = logits.float().softmax(-1)
    if relaxation == "soft":
        return probs
    if relaxation == "straight-through":
        soft = (logits.float() + gumbel).softmax(-1)
        hard = F.one_hot(soft.argmax(-1), probs.shape[-1]).float()
        return hard + soft - soft.detach()
    raise ValueError(f"unknown relaxation {relaxation!r}: use soft or straight-through")


# ------------------------------------------------------------------ the stage


@dataclass
class DistillParts:
    """What distillation reads. The teacher is a MaskedTransformer with a VQTokenizer, or any model and tokenizer
    with the same methods (softdimo.muse adapts diffusers' MUSE models); the student copies the teacher."""

    teacher: MaskedTransformer
    tokenizer: VQTokenizer
    conditioner: Conditioner
    reward: Reward | None
    initial: MaskedTransformer | None = None  # the generator to continue from (a one-step model); the teacher when None
    prior: LayoutPrior | None = (
        None  # the layout prior of `initial`, if it has one: its latents are drawn from it (kept as is)
    )
    # Prompts to distil on, drawn uniformly each step; None draws Shapes prompts and images. Without Shapes images
    # there are no real tokens for the discriminator, so own prompts leave the GAN out (Di[M]O and reward terms).
    prompts: Sequence[str] | None = None


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def train_distill(
    *,
    run_dir: Path,
    parts: DistillParts,
    generator_settings: GeneratorSettings,
    training: DistillTraining,
    device: torch.device,
) -> OneStepGenerator:
    if parts.prompts is not None and training.gan_weight:
        raise ValueError(
            "the GAN needs real images: distil on Shapes samples (no prompts of your own) or set gan_weight = 0"
        )
    if parts.prompts is not None and not parts.prompts:
        raise ValueError("no prompts to distil on")
    torch.manual_seed(training.seed)
    world = distributed.current()
    teacher = _freeze(parts.teacher.to(device))
    tokenizer = _freeze(parts.tokenizer.to(device))
    student = copy.deepcopy(parts.initial or teacher).to(device).train()
    aux = copy.deepcopy(teacher).train()
    for model in (student, aux):
        for p in model.parameters():
            p.requires_grad_(True)
        # As in Di[M]O, the embedding tables and positions stay the teacher's.
        for p in model.input_parameters():
            p.requires_grad_(False)
    ema = _freeze(copy.deepcopy(student))
    prior = None if parts.prior is None else parts.prior.to(device).eval().requires_grad_(False)
    generator = OneStepGenerator(student, generator_settings, prior)
    depth = teacher.cfg.depth
    layers = tuple(sorted({layer % depth for layer in training.gan_layers}))
    disc = DiscriminatorHeads(teacher.cfg.state_width, len(layers)).to(device)
    # What each process calls: DDP wrappers (gradients averaged over ranks) under torchrun, the modules themselves
    # alone.
    student_forward, aux_forward, disc_forward = (distributed.wrap(m) for m in (EmbeddingForward(student), aux, disc))

    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    opt_g = torch.optim.Adam(trainable(student), lr=training.lr, betas=(0.9, 0.999))
    opt_aux = torch.optim.Adam(trainable(aux), lr=training.aux_lr, betas=(0.9, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=training.disc_lr, betas=(0.5, 0.999))
    eval_prompts = loop.training_eval_prompts(training.eval_prompts, parts.conditioner.kinds)
    mask_id = teacher.cfg.mask_id

    def step_fn(step: int) -> dict[str, float]:
        for opt, peak in ((opt_g, training.lr), (opt_aux, training.aux_lr), (opt_d, training.disc_lr)):
            loop.set_lr(opt, loop.cosine_lr(step, training.steps, peak, training.warmup))
        rng = np.random.default_rng([training.seed, step])
        g = torch.Generator().manual_seed(training.seed * 1_000_003 + step)
        # Every rank draws the whole global batch and its randomness, and keeps its own rows of them.
        b, n, rows = training.batch_size, teacher.cfg.tokens, world.rows(training.batch_size)
        if parts.prompts is None:
            images, prompts, labels = shapes.batch(rng, b, kinds=parts.conditioner.kinds, placement=training.placement)
        else:
            images, labels = None, np.zeros(b, dtype=np.int64)
            prompts = [parts.prompts[i] for i in rng.integers(0, len(parts.prompts), size=b)]
        condition = parts.conditioner.from_samples(prompts, labels)[rows].to(device)
        noise = ImageNoise(rng.integers(0, 2**62, size=b).tolist()[rows], device)
        images, prompts, labels = None if images is None else images[rows], prompts[rows], labels[rows]

        # -- generator: Di[M]O surrogate at re-masked positions of its own samples
        logits = student_forward(generator.initial_embeddings(noise, condition), condition)  # (B, N, K)
        gumbel = generator.token_noise(noise)
        with torch.no_grad():
            tokens = generator.tokens_from(logits, gumbel)
            ratio = mask_ratio(torch.rand(b, generator=g), training.schedule).clamp(0.02, 0.98)[rows].to(device)
            noisy, mask = mask_tokens(tokens, ratio, torch.rand(b, n, generator=g)[rows].to(device), mask_id)
        metrics = {}
        loss_g = logits.sum() * 0.0  # every term below adds to it; with none, the step changes nothing
        if training.dimo_weight:
            with torch.no_grad():
                teacher_logits = guided_logits(teacher, noisy, condition, training.guidance)
                aux_logits = aux_forward(noisy, condition)
                grad = jeffreys_logit_gradient(aux_logits, teacher_logits, training.beta)
            loss_dimo = surrogate_loss(logits.float(), grad, mask.float())
            metrics["dimo"] = loss_dimo.item()
            loss_g = loss_g + training.dimo_weight * loss_dimo
        if training.gan_weight or training.reward_weight:
            relaxed = relaxed_tokens(logits, training.relaxation, gumbel)
        if training.gan_weight:
            fake = mask_replace(teacher.soft_embed(relaxed), teacher.mask_embedding(), training.gan_mask_max, g, world)
            loss_gan = F.softplus(-disc_forward(teacher.hidden_states(fake, condition, layers))).mean()
            loss_g = loss_g + training.gan_weight * loss_gan
            metrics["gan_g"] = loss_gan.item()
        if training.reward_weight:
            texts = parts.conditioner.sample_texts(prompts, labels)
            score = parts.reward.score(tokenizer.decode_soft(relaxed), texts)
            loss_g = loss_g - training.reward_weight * score.mean()
            metrics["reward"] = score.mean().item()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        torch.nn.utils.clip_grad_norm_(trainable(student), 1.0)
        opt_g.step()

        # -- auxiliary model: cross-entropy on a fresh re-masking of the generator's samples
        ratios = mask_ratio(torch.rand(b, generator=g), training.schedule).clamp(0.02, 0.98)
        noisy, mask = mask_tokens(
            tokens, ratios[rows].to(device), torch.rand(b, n, generator=g)[rows].to(device), mask_id
        )
        if training.dimo_weight:
            aux_out = aux_forward(noisy, condition)
            if world.size == 1:
                loss_aux = F.cross_entropy(aux_out[mask], tokens[mask], label_smoothing=training.aux_label_smoothing)
            else:  # this rank's share of the mean over the global batch's masked tokens
                summed = F.cross_entropy(
                    aux_out[mask], tokens[mask], label_smoothing=training.aux_label_smoothing, reduction="sum"
                )
                loss_aux = summed * world.size / mask_counts(ratios, n).sum()
            opt_aux.zero_grad(set_to_none=True)
            loss_aux.backward()
            torch.nn.utils.clip_grad_norm_(trainable(aux), 1.0)
            opt_aux.step()
            metrics["aux"] = loss_aux.item()

        # -- discriminator heads: real = embeddings of data tokens, fake = the generator's relaxed embeddings
        if training.gan_weight:
            with torch.no_grad():
                real_tokens = tokenizer.encode(to_tensor(images).to(device))
                mask_embedding = teacher.mask_embedding()
                real = mask_replace(teacher.embed(real_tokens), mask_embedding, training.gan_mask_max, g, world)
                fake = mask_replace(
                    teacher.soft_embed(relaxed.detach()), mask_embedding, training.gan_mask_max, g, world
                )
            d_real = disc_forward(teacher.hidden_states(real, condition, layers))
            d_fake = disc_forward(teacher.hidden_states(fake, condition, layers))
            loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            metrics["gan_d"] = loss_d.item()

        with torch.no_grad():
            decay = min(training.ema, (1 + step) / (10 + step))  # short runs must not stay near the teacher's weights
            for e, s in zip(ema.parameters(), student.parameters()):
                e.lerp_(s, 1 - decay)
        return metrics

    def eval_fn(step: int) -> dict[str, float]:
        return loop.one_step_metrics(
            OneStepGenerator(ema, generator_settings, prior), tokenizer, parts.conditioner, eval_prompts
        )

    loop.run(
        run_dir=run_dir,
        modules={"student": student, "aux": aux, "ema": ema, "disc": disc},
        optimizers={"student": opt_g, "aux": opt_aux, "disc": opt_d},
        step_fn=step_fn,
        steps=training.steps,
        eval_fn=eval_fn if isinstance(parts.conditioner, Conditioner) else None,  # the Shapes judge reads Shapes models
        eval_every=training.eval_every,
        description="distill",
    )
    return OneStepGenerator(ema, generator_settings, prior)


class EmbeddingForward(nn.Module):
    """A model's forward from input embeddings as a module's `forward`, the one call DDP synchronises."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.model.forward_embeddings(embeddings, condition)
