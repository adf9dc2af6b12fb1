"""Multi-step masked-diffusion sampling (MaskGIT): mask schedules and confidence-based iterative decoding."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from softdimo.seeding import ImageNoise
from softdimo.transformer import MaskedTransformer


def mask_ratio(progress: torch.Tensor | float, schedule: str = "cosine") -> torch.Tensor:
    """Fraction of tokens still masked at `progress` in [0, 1] (1 at the start, 0 at the end)."""
    p = torch.as_tensor(progress, dtype=torch.float32)
    if schedule == "cosine":
        return torch.cos(p * math.pi / 2)
    if schedule == "arccos":
        return torch.arccos(p) / (math.pi / 2)
    if schedule == "linear":
        return 1 - p
    raise ValueError(f"unknown mask schedule {schedule!r}; use cosine, arccos or linear")


@dataclass(frozen=True)
class SamplerSettings:
    """How a teacher samples. The defaults are the shipped text teachers' (recipes/shapes-teacher-text.toml); a
    bundle stores every field in its config.json, and a field an older bundle lacks takes its default here."""

    steps: int = 16
    # Classifier-free guidance w: logits = cond + w * (cond - uncond). 1.0: the text teachers sample under a draw
    # check, which restores the pass rate that stronger guidance buys with variety (weights/README.md, "Variety").
    guidance: float = 1.0
    temperature: float = 1.0  # token sampling temperature
    # Gumbel noise on confidences, annealed to 0 over the steps. 2.0: without it every seed commits the same first
    # tokens, so one layout a prompt; MaskGIT's 4.5 scatters the first committed tokens of a 64-token grid.
    choice_temperature: float = 2.0
    schedule: str = "cosine"
    # Guidance only on the steps whose progress at their start lies in [guidance_start, guidance_end), a limited
    # interval as Kynkäänniemi et al. (2024) apply it in diffusion: MaskGIT's first steps commit where objects go.
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    # Guide a prompt that has contrast prompts (Conditioner.contrasts: a relation's two perpendicular relations)
    # away from them instead of from the null prompt, as a negative prompt does; other prompts are unchanged.
    # Off by default: only text prompts have contrasts (the text teachers' recipe turns it on), and the class
    # teacher's config.json, written before this field, relies on this default.
    contrast: bool = False

    def __post_init__(self):
        if self.contrast not in (True, False):  # 0 and 1 from the command line too
            raise ValueError(f"contrast is on or off (1 or 0), got {self.contrast!r}")
        object.__setattr__(self, "contrast", bool(self.contrast))
        if not 0 <= self.guidance_start <= self.guidance_end <= 1:
            raise ValueError(
                f"guidance runs over 0 <= start <= end <= 1, got {self.guidance_start} to {self.guidance_end}"
            )

    def guidance_at(self, step: int) -> float:
        """The guidance weight of one step (0: the conditional logits alone)."""
        return self.guidance if self.guidance_start <= step / self.steps < self.guidance_end else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def guided_logits(
    model: MaskedTransformer,
    tokens: torch.Tensor,
    condition: torch.Tensor,
    guidance: float,
    contrasts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Classifier-free guided logits, cond + w * (cond - reference), in one forward pass over the conditional rows
    and their references: the null prompt, or for rows with `contrasts` ((B, K, ...) conditions and (B,) which
    rows have them) the mean of their contrasts' logits. A row without contrasts takes the null prompt for each of
    its K, so its reference is exactly the null prompt's logits."""
    if guidance == 0:
        return model(tokens, condition)
    b = tokens.shape[0]
    null = model.null_condition(b, tokens.device)
    if contrasts is None:
        references = null[None]
    else:
        others, has = contrasts
        rows = has.view(b, *[1] * (others.dim() - 1))
        references = torch.where(rows, others, null[:, None]).transpose(0, 1)  # (K, B, ...)
    k = references.shape[0]
    out = model(torch.cat([tokens] * (1 + k)), torch.cat([condition, *references]))
    cond, reference = out[:b], out[b:].view(k, b, *out.shape[1:]).mean(0)
    return cond + guidance * (cond - reference)


@torch.no_grad()
def sample(
    model: MaskedTransformer,
    condition: torch.Tensor,
    noise: ImageNoise,
    settings: SamplerSettings,
    contrasts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """MaskGIT decoding from an all-mask grid -> tokens (B, N). Each image's randomness comes from its own seed;
    `contrasts` as guided_logits takes them (used when settings.contrast)."""
    tokens = torch.full((len(noise), model.cfg.tokens), model.cfg.mask_id, dtype=torch.long, device=condition.device)
    return fill(model, tokens, condition, noise, settings, contrasts)


@torch.no_grad()
def fill(
    model: MaskedTransformer,
    tokens: torch.Tensor,
    condition: torch.Tensor,
    noise: ImageNoise,
    settings: SamplerSettings,
    contrasts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """MaskGIT decoding of the positions of `tokens` (B, N) that hold the mask id; the others never change.

    Each row's schedule runs over the tokens it starts with masked (all N for `sample`): after a step at progress
    p, floor(masked * mask_ratio(p)) of them are still masked."""
    cfg = model.cfg
    n = cfg.tokens
    device = condition.device
    tokens = tokens.to(device)
    to_fill = (tokens == cfg.mask_id).sum(-1).tolist()
    for step in range(settings.steps):
        masked = tokens == cfg.mask_id
        guidance = settings.guidance_at(step)
        logits = guided_logits(model, tokens, condition, guidance, contrasts if settings.contrast else None).float()
        log_probs = torch.log_softmax(logits / max(settings.temperature, 1e-6), dim=-1)
        gumbel = noise.gumbel(n, cfg.codebook_size).to(device)
        drawn = (log_probs + gumbel).argmax(-1) if settings.temperature > 0 else log_probs.argmax(-1)
        drawn = torch.where(masked, drawn, tokens)
        progress = (step + 1) / settings.steps
        ratio = float(mask_ratio(progress, settings.schedule))
        scheduled = [int(math.floor(count * ratio)) for count in to_fill]
        if max(scheduled) == 0:
            tokens = drawn
            break
        confidence = torch.gather(log_probs, -1, drawn[..., None])[..., 0]
        confidence = confidence + settings.choice_temperature * (1 - progress) * noise.gumbel(n).to(device)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, math.inf))
        # Re-mask each row's least confident still-masked positions; always fewer than are masked now.
        keep_masked = torch.minimum(torch.tensor(scheduled, device=device), masked.sum(-1) - 1).clamp_min(0)  # (B,)
        threshold = confidence.sort(-1).values.gather(1, keep_masked[:, None])  # (B, 1); below the least: none
        tokens = torch.where(confidence < threshold, cfg.mask_id, drawn)
    return tokens


def mask_counts(ratio: torch.Tensor, n: int) -> torch.Tensor:
    """How many of n tokens `mask_tokens` masks at each ratio (B,): round(n * ratio), at least one."""
    return (ratio * n).round().clamp(1, n).long()


def mask_tokens(
    tokens: torch.Tensor, ratio: torch.Tensor, scores: torch.Tensor, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask exactly round(N * ratio_b) (at least one) tokens per row, chosen by the lowest `scores`.

    Returns (masked tokens, boolean mask)."""
    n = tokens.shape[1]
    count = mask_counts(ratio, n)  # (B,)
    rank = scores.argsort(-1).argsort(-1)  # (B, N): rank of each position's score
    mask = rank < count[:, None]
    return torch.where(mask, mask_id, tokens), mask
