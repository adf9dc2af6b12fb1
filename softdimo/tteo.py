"""Test-time embedding optimisation: gradient steps on a one-step generator's input against a reward."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Sequence

import torch

from softdimo.editing import Kept, one_step_inputs
from softdimo.generator import OneStepGenerator
from softdimo.reward import Reward
from softdimo.seeding import ImageNoise, derived_seed
from softdimo.vq import VQTokenizer

TARGETS = ("input", "logits", "latent")
# Candidates per image when a request names none: the HTTP contract's default (one, so /refine starts from the
# image /generate draws), for the CLI too, whatever best_of a bundle saved.
REQUEST_BEST_OF = 1


@dataclass(frozen=True)
class TTEOSettings:
    steps: int = 20
    lr: float = 0.2  # plain SGD, as in Soft-Di[M]O
    best_of: int = 1  # candidates drawn per image; the best by reward is optimised
    # What is optimised: "input", the input embeddings (the paper); "logits", the output logits directly; "latent",
    # the layout latent of a model with one (every step moves the whole layout the generator reads from it).
    target: str = "input"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"TTEO target must be one of {', '.join(TARGETS)}, got {self.target!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def for_request(
        self,
        *,
        steps: int | None = None,
        lr: float | None = None,
        best_of: int | None = None,
        target: str | None = None,
    ) -> TTEOSettings:
        """A request's settings, built here only: what it asks for; for what it leaves out, these (the model's)
        steps, lr and target, and REQUEST_BEST_OF candidates."""
        asked = {"steps": steps, "lr": lr, "target": target}
        best_of = REQUEST_BEST_OF if best_of is None else best_of
        return replace(self, **{k: v for k, v in asked.items() if v is not None}, best_of=best_of)


@dataclass
class Refined:
    """Per image: final tokens, the seed of the chosen candidate, rewards before and after, and the per-step trace."""

    tokens: torch.Tensor  # (B, N)
    images: torch.Tensor  # (B, 3, H, W) in [0, 1], decoded from `tokens`
    seeds: list[int]  # the candidate each image started from
    reward_before: torch.Tensor  # (B,) reward of the starting image, as /generate draws it
    reward_after: torch.Tensor  # (B,) reward of the returned image
    trace: torch.Tensor  # (steps, B) reward of the soft-decoded image at each step


def candidate_seeds(seeds: Sequence[int], best_of: int) -> list[list[int]]:
    """The candidates of the image with seed s: s itself, then best_of - 1 seeds derived from s
    (softdimo.seeding.derived_seed). With best_of = 1 /refine starts from /generate's image; the candidates depend on
    the image's seed alone, so neither batch-mates nor how a request is split change them, and two images of
    different seeds (in one request or in a seed sweep over requests) share no candidate."""
    return [[seed, *(derived_seed(seed, j) for j in range(1, best_of))] for seed in seeds]


StepHook = Callable[[int, torch.Tensor], "torch.Tensor | None"]
# (noise, conditioning, what an edit keeps or None, a pause to run between its own pieces of work) -> candidates'
# input embeddings without the latent, their latents and their token noise
Start = Callable[
    [ImageNoise, torch.Tensor, "Kept | None", Callable[[], object]],
    "tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]",
]


@dataclass(frozen=True)
class Chunks:
    """TTEO's work in pieces of at most `size` images, with `pause()` run between any two pieces: the start (each
    candidate drawn and scored; each round of a draw check's redraws), every step (forward, soft decoding, reward
    and backward) and the end (the final images decoded and scored). Every image is computed on its own and each
    step sums the pieces' gradients before its one SGD update, so the results are the unchunked ones, up to float
    rounding; a server runs waiting interactive work in the pauses, so that it waits for one piece rather than a
    whole step."""

    size: int | None  # images (candidates, at the start) per piece; None: a whole batch, pausing between steps
    pause: Callable[[], object]

    def __post_init__(self):
        if self.size is not None and self.size < 1:
            raise ValueError(f"a chunk holds at least one image, got {self.size}")


class _Pieces:
    """The row ranges of a refine's pieces of work, one phase after another, `chunks.pause()` run between any two
    (none before the first): without chunks, each phase is one piece and nothing pauses."""

    def __init__(self, chunks: Chunks | None):
        self.chunks = chunks
        self.begun = False

    def of(self, n: int) -> Iterator[slice]:
        size = n if self.chunks is None or self.chunks.size is None else self.chunks.size
        for first in range(0, n, max(size, 1)):
            if self.begun:
                self.pause()
            self.begun = True
            yield slice(first, first + size)

    def pause(self) -> None:
        """A pause between two pieces, also within one of `of`'s (a draw check's rounds of redraws)."""
        if self.chunks is not None:
            self.chunks.pause()


def refine(
    *,
    generator: OneStepGenerator,
    tokenizer: VQTokenizer,
    reward: Reward,
    condition: torch.Tensor,
    prompts: Sequence[str],
    candidates: Sequence[Sequence[int]],
    settings: TTEOSettings,
    on_step: StepHook | None = None,
    kept: Kept | None = None,
    start: Start | None = None,
    chunks: Chunks | None = None,
) -> Refined:
    """Optimise each image independently (the loss is a sum of per-image terms), all in one batch.

    `candidates` holds each image's `settings.best_of` candidate seeds (see `candidate_seeds`). With `kept`, an
    edit of each image: it starts from the edit `editing.fill_one_step` draws, and its kept tokens and pixels stay
    the input's in every step, in what the reward sees and in the result. With `start`, each candidate starts from
    the input it gives (a pipeline's checked draw) in place of the generator's own draw.
    `on_step(step, rewards)`, called after each step with every image's reward (B,), may return which images
    are still wanted (B,) bool: the others stop being optimised (their gradient is zeroed, so the images of
    the rest come out exactly as they would have), and when none is wanted the loop ends early. With `chunks`, the
    work runs in pieces of that many images, pausing between them (`Chunks`)."""
    b, n_best = len(candidates), settings.best_of
    if any(len(row) != n_best for row in candidates):
        raise ValueError(f"each image needs best_of = {n_best} candidate seeds")
    device = generator.device
    if settings.target == "latent" and not generator.cfg.latent_dim:
        raise ValueError("TTEO on the layout latent needs a model with one (latent_dim > 0)")
    candidates = [s for row in candidates for s in row]
    prompts = list(prompts)
    each = torch.arange(b, device=device).repeat_interleave(n_best)  # the image of each candidate
    candidate_kept = None if kept is None else kept.rows(each)
    pieces = _Pieces(chunks)

    def hard_tokens(logits: torch.Tensor, gumbel: torch.Tensor, kept: Kept | None) -> torch.Tensor:
        drawn = generator.tokens_from(logits, gumbel)
        return drawn if kept is None else kept.tokens_with(drawn)

    def decoded(tokens: torch.Tensor, kept: Kept | None) -> torch.Tensor:
        images = tokenizer.decode_indices(tokens)
        return images if kept is None else kept.images_with(images)

    def drawn_candidates(rows: slice, condition: torch.Tensor) -> tuple:
        """The candidates at `rows`, as they start: their input parts, token noise, logits, tokens and scores."""
        noise = ImageNoise(candidates[rows], device)
        kept = None if candidate_kept is None else candidate_kept.rows(rows)
        if start is not None:
            base, latent, gumbel = start(noise, condition, kept, pieces.pause)  # (C, N, D), (C, L), (C, N, K)
            pieces.pause()  # after the start's own work, before the forward pass and score below
        else:
            if kept is None:
                base, latent = generator.input_parts(noise, condition)  # (C, N, D), (C, latent_dim) or None
            else:
                base, latent = one_step_inputs(generator, kept, condition, noise)
            gumbel = generator.token_noise(noise)  # the same draw /generate (or the edit) samples its tokens with
        embeddings = generator.with_latent(base, latent)
        logits = generator.logits(embeddings, condition)
        tokens = hard_tokens(logits, gumbel, kept)
        scores = reward.score(decoded(tokens, kept), [prompts[i] for i in each[rows].tolist()])
        return base, latent, gumbel, embeddings, logits, tokens, scores

    with torch.no_grad():
        repeated = condition.to(device)[each]
        parts = [drawn_candidates(rows, repeated[rows]) for rows in pieces.of(len(candidates))]
        base, latent, gumbel, embeddings, logits, tokens, scores = (_cat(column) for column in zip(*parts))
        best = scores.view(b, n_best).argmax(-1) + torch.arange(b, device=device) * n_best  # (B,)
    initial = {"input": embeddings, "logits": logits, "latent": latent}[settings.target][best]
    condition, gumbel, tokens_before, reward_before = repeated[best], gumbel[best], tokens[best], scores[best]
    base = base[best]

    def output_logits(variable: torch.Tensor, rows: slice) -> torch.Tensor:
        """The logits of the images at `rows`, from their part of the optimised variable."""
        if settings.target == "input":
            return generator.logits(variable, condition[rows])
        if settings.target == "latent":
            return generator.logits(generator.with_latent(base[rows], variable), condition[rows])
        return variable

    variable = initial.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([variable], lr=settings.lr)
    trace = []
    wanted = torch.ones(b, dtype=torch.bool, device=device)
    with torch.enable_grad():
        for step in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            scores = []
            for rows in pieces.of(b):  # each piece's gradient adds into `variable.grad`, in rows no other touches
                part = None if kept is None else kept.rows(rows)
                z = output_logits(variable[rows], rows)
                probs = z.float().softmax(-1)
                soft = tokenizer.decode_soft(probs if part is None else part.probs_with(probs))
                score = reward.score(soft if part is None else part.images_with(soft), prompts[rows])
                (-score.sum()).backward()
                scores.append(score.detach())
            score = torch.cat(scores)
            variable.grad[~wanted] = 0
            optimizer.step()
            trace.append(score)
            if on_step is not None:
                still = on_step(step + 1, score)
                if still is not None:
                    wanted &= still.to(device)
                    if not wanted.any():
                        break
    with torch.no_grad():
        ends = []
        for rows in pieces.of(b):
            part = None if kept is None else kept.rows(rows)
            tokens_after = hard_tokens(output_logits(variable[rows], rows), gumbel[rows], part)
            images_after = decoded(tokens_after, part)
            reward_after = reward.score(images_after, prompts[rows])
            # Never hand back an image the reward likes less than the one we started from.
            worse = reward_after < reward_before[rows]
            tokens_out = torch.where(worse[:, None], tokens_before[rows], tokens_after)
            images_out = decoded(tokens_out, part) if worse.any() else images_after
            ends.append((tokens_out, images_out, reward_after))
        tokens_out, images_out, reward_after = (torch.cat(column) for column in zip(*ends))
    return Refined(
        tokens=tokens_out,
        images=images_out,
        seeds=[candidates[i] for i in best.tolist()],
        reward_before=reward_before,
        reward_after=torch.maximum(reward_after, reward_before),
        trace=torch.stack(trace) if trace else torch.empty(0, b),
    )


def _cat(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Pieces' tensors joined along the batch; None for what a model without a layout latent has none of."""
    return None if parts[0] is None else torch.cat(parts)
