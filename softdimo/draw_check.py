"""Checked draws: an image drawn again from its next proposal while the reward scores it below a bar.

A layout prior spread over a prompt's layouts proposes latents that the generator draws right and latents it draws
wrong (pieces of two layouts, an object missing). Tuning the prior by the reward avoids the second kind by moving each
prompt's weight onto the few components that draw right for almost every latent in them: the images pass, and repeat.
A check keeps the spread instead. Each image's prior, flattened by `prior_temperature`, proposes `proposals` latents
from the image's own seed; the image is drawn from the first in one forward pass and scored by the reward, and drawn
again from the next only while it scores below `bar`; if none clears it, the best-scored is kept. Taking the first
image that clears the bar, not the best of all, keeps the proposals' variety: every image that clears it is as likely
as the prior made it, however much the reward prefers some layouts to others. An image costs one forward pass and one
reward score, and one of each again for every proposal refused.

A teacher is checked the same way (`first_clearing`, the rounds both share): its proposals are its samples from the
image's seed and from that seed's derived seeds, so a teacher sampled with less guidance, whose images spread over
more layouts and pass less often, passes again without narrowing.

Every draw depends on the image's own seed and conditioning only. Under a compiled runtime, whose network runs only
at its bucket sizes, `ROUND_SIZE` pads each round of redraws to one of them."""

from __future__ import annotations

import contextvars
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from softdimo.editing import Kept, decode_edit, edit_embeddings
from softdimo.generator import OneStepGenerator
from softdimo.reward import Reward
from softdimo.seeding import ImageNoise
from softdimo.vq import VQTokenizer

# The batch size a round of n redraws runs at (extra rows repeat the last): n itself unless a runtime says otherwise
ROUND_SIZE: contextvars.ContextVar[Callable[[int], int]] = contextvars.ContextVar("round_size", default=lambda n: n)
# Told each checked batch's draws per image (B,), e.g. to count what the check costs; None: nobody is counting
DRAWS_SEEN: contextvars.ContextVar[Callable[[torch.Tensor], None] | None] = contextvars.ContextVar(
    "draws_seen", default=None
)


@dataclass(frozen=True)
class DrawCheck:
    reward: str  # which of the model's rewards scores the images
    bar: float  # an image scoring below it is drawn again from the next proposal
    proposals: int = 4  # latents proposed per image: the most draws an image costs
    # a one-step model's proposals' prior, flattened: above 1 it spreads over more of the layouts (a teacher has none)
    prior_temperature: float = 4.0

    def __post_init__(self):
        if self.proposals < 1:
            raise ValueError(f"a draw check's proposals must be at least 1, got {self.proposals}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckedDraw:
    """Per image: its input embeddings without the latent, the latent it was drawn from, its token noise, tokens,
    decoded image, reward and how many draws it took."""

    embeddings: torch.Tensor  # (B, N, D)
    latent: torch.Tensor  # (B, latent_dim)
    gumbel: torch.Tensor  # (B, N, K)
    tokens: torch.Tensor  # (B, N)
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    scores: torch.Tensor  # (B,)
    draws: torch.Tensor  # (B,) the proposals drawn, 1 .. proposals


@torch.no_grad()
def checked_draw(
    generator: OneStepGenerator,
    tokenizer: VQTokenizer,
    reward: Reward,
    check: DrawCheck,
    condition: torch.Tensor,
    texts: Sequence[str],
    noise: ImageNoise,
    kept: Kept | None = None,
    *,
    between_rounds: Callable[[], object] | None = None,
) -> CheckedDraw:
    """Images for a batch (conditioning (B, ...), the texts the reward reads, one noise stream per image), each
    drawn from the first of its proposed latents whose image clears the bar (`DrawCheck`); with `kept`, edits of
    its images, which keep their tokens and pixels where the edit leaves them, in what the reward scores too. Each
    stream draws, in order, the input embeddings, the proposals and the token noise: with one proposal at the
    generator's own prior temperature, the image is the unchecked one. `between_rounds` runs before each round of
    redraws (other work that must not wait for the whole check)."""
    if generator.prior is None:
        raise ValueError("a draw check chooses among a layout prior's proposals: this generator has none")
    condition = condition.to(generator.device)
    embeddings = generator.token_embeddings(noise) if kept is None else edit_embeddings(generator, kept, noise)
    proposals = generator.layout_latents(noise, condition, check.proposals, check.prior_temperature)
    gumbel = generator.token_noise(noise)

    def draw(proposal: int, rows: torch.Tensor) -> torch.Tensor:
        latent = proposals[rows, proposal]
        logits = generator.logits(generator.with_latent(embeddings[rows], latent), condition[rows])
        return generator.tokens_from(logits, gumbel[rows])

    first = first_clearing(draw, tokenizer, reward, check, texts, generator.device, kept, between_rounds=between_rounds)
    latent = proposals[torch.arange(len(condition), device=generator.device), first.chosen]
    return CheckedDraw(embeddings, latent, gumbel, first.tokens, first.images, first.scores, first.draws)


@dataclass
class Cleared:
    """Per image: the tokens and decoded image of the proposal kept, its reward, which proposal it was and how many
    were drawn."""

    tokens: torch.Tensor  # (B, N)
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    scores: torch.Tensor  # (B,)
    chosen: torch.Tensor  # (B,) the kept proposal, 0 .. proposals - 1
    draws: torch.Tensor  # (B,) the proposals drawn, 1 .. proposals


@torch.no_grad()
def first_clearing(
    draw: Callable[[int, torch.Tensor], torch.Tensor],
    tokenizer,
    reward: Reward,
    check: DrawCheck,
    texts: Sequence[str],
    device: torch.device,
    kept: Kept | None = None,
    *,
    between_rounds: Callable[[], object] | None = None,
) -> Cleared:
    """The check's rounds, whatever proposes: `draw(proposal, rows)` gives the tokens (R, N) of the images at
    `rows` (R,) drawn from their proposal number `proposal`, on `device`; each image keeps the first whose decoded
    image (an edit's, with `kept`) scores at least the bar, else its best. A round draws only the images still below
    the bar, padded to `ROUND_SIZE`; `between_rounds` runs before each round of redraws (other work that must not
    wait for the whole check), and `DRAWS_SEEN` is told every image's draws."""
    b = len(texts)
    best = torch.full((b,), -torch.inf, device=device)
    chosen = torch.zeros(b, dtype=torch.long, device=device)
    draws = torch.zeros(b, dtype=torch.long, device=device)
    tokens: torch.Tensor | None = None
    images: torch.Tensor | None = None
    pending = torch.arange(b, device=device)
    for j in range(check.proposals):
        if j and between_rounds is not None:
            between_rounds()
        drawn = draw(j, _padded(pending, ROUND_SIZE.get()(len(pending))))[: len(pending)]
        if kept is None:
            pictures = tokenizer.decode_indices(drawn)
        else:
            edited = kept.rows(pending)
            drawn = edited.tokens_with(drawn)
            pictures = decode_edit(tokenizer, drawn, edited)
        scores = reward.score(pictures, [texts[i] for i in pending.tolist()]).float()
        if images is None:
            tokens = torch.zeros(b, *drawn.shape[1:], dtype=drawn.dtype, device=device)
            images = torch.zeros(b, *pictures.shape[1:], dtype=pictures.dtype, device=pictures.device)
        better = scores > best[pending]
        keep = pending[better]
        best[keep], chosen[keep], tokens[keep], images[keep] = scores[better], j, drawn[better], pictures[better]
        draws[pending] += 1
        pending = pending[scores < check.bar]
        if not len(pending):
            break
    if (seen := DRAWS_SEEN.get()) is not None:
        seen(draws)
    return Cleared(tokens, images, best, chosen, draws)


def _padded(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows`, the last repeated up to `size`."""
    return torch.cat([rows, rows[-1:].expand(size - len(rows))]) if size > len(rows) else rows
