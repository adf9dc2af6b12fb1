"""Editing an image: its tokens are kept where the edit leaves them, and the rest (the repainted tokens) are filled
in by a one-step generator in one forward pass or by a teacher in its MaskGIT steps (inpainting, image-to-image);
`EditsByFilling` is that editing as a pipeline offers it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from softdimo.generator import OneStepGenerator
from softdimo.sampler import SamplerSettings, fill
from softdimo.seeding import ImageNoise
from softdimo.transformer import MaskedTransformer
from softdimo.vq import to_tensor, to_uint8


def image_tokens(tokenizer, images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 images (B, H, W, 3) at the tokenizer's size -> their tokens (B, N) on `device`."""
    size = tokenizer.cfg.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"images to edit are (B, {size}, {size}, 3) uint8, got {tuple(images.shape)}")
    return tokenizer.encode(to_tensor(images).to(device))


def repaint_from_mask(masks: np.ndarray | torch.Tensor, grid: int) -> torch.Tensor:
    """Pixel masks (B, H, W), True where to repaint -> the tokens to repaint (B, grid * grid): every token whose
    patch holds at least one True pixel."""
    masks = torch.as_tensor(np.asarray(masks, dtype=bool))
    b, h, w = masks.shape
    if h % grid or w % grid:
        raise ValueError(f"a {h}x{w} mask does not split into a {grid}x{grid} grid of patches")
    touched = F.max_pool2d(masks[:, None].float(), kernel_size=(h // grid, w // grid))  # (B, 1, grid, grid)
    return touched.flatten(1).bool()


# Image-to-image where neither a mask nor a strength is given: half of the tokens are repainted.
DEFAULT_STRENGTH = 0.5


def repaint_count(strength: float, tokens: int) -> int:
    """How many of `tokens` image-to-image at `strength` in [0, 1] repaints: round(strength * tokens)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength is in [0, 1], got {strength}")
    return round(strength * tokens)


def repaint_at_strength(seeds: Sequence[int], strength: float, tokens: int) -> torch.Tensor:
    """Image-to-image: for each seed, `repaint_count(strength, tokens)` tokens chosen at random by that seed alone
    (B, tokens). The choice is the first draw of a generator of its own on the seed, so it is the same for a teacher
    and a one-step model, and whatever else the request asks."""
    order = ImageNoise(seeds).permutation_scores(tokens).argsort(-1)  # (B, tokens)
    repaint = torch.zeros(len(seeds), tokens, dtype=torch.bool)
    return repaint.scatter(1, order[:, : repaint_count(strength, tokens)], True)


# Patches this many tokens (rows, columns or diagonally) around a repainted one show the decoder's pixels too, so the
# repainted region blends into the kept one; every patch farther away shows the input image's own pixels.
BLEND_REACH = 1


def patch_dilation(repaint: torch.Tensor, grid: int, reach: int = BLEND_REACH) -> torch.Tensor:
    """Tokens (B, grid * grid) within `reach` tokens of a repainted one."""
    b = repaint.shape[0]
    spread = F.max_pool2d(repaint.view(b, 1, grid, grid).float(), kernel_size=2 * reach + 1, stride=1, padding=reach)
    return spread.flatten(1).bool()


@dataclass(frozen=True)
class Kept:
    """What an edit keeps of its images: their tokens outside `repaint`, and their pixels farther than BLEND_REACH
    tokens from a repainted one.

    Kept tokens alone would not keep pixels: the decoder's normalisation and its 3x3 convolutions reach across the
    whole grid, so a repainted token moves the pixels of distant kept patches a little; the input's own pixels
    there also spare the kept part the tokenizer's reconstruction error."""

    tokens: torch.Tensor  # (B, N) the images' tokens
    repaint: torch.Tensor  # (B, N) bool: where the model draws new tokens
    pixels: torch.Tensor  # (B, 3, H, W) in [0, 1]: the images

    @classmethod
    def of(cls, tokenizer, images: np.ndarray, repaint: torch.Tensor, device: torch.device | str) -> Kept:
        """uint8 images (B, H, W, 3) at the tokenizer's size and their tokens to repaint (B, N), on `device`."""
        tokens = image_tokens(tokenizer, images, device)
        return cls(tokens=tokens, repaint=repaint.to(device), pixels=to_tensor(images).to(device))

    def rows(self, index: torch.Tensor | slice) -> Kept:
        """The images at `index` (B',), in its order: a selection, each image repeated, or a range of them."""
        return Kept(tokens=self.tokens[index], repaint=self.repaint[index], pixels=self.pixels[index])

    def tokens_with(self, drawn: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N): `drawn` where repainted, the images' own elsewhere."""
        return torch.where(self.repaint, drawn, self.tokens)

    def probs_with(self, probs: torch.Tensor) -> torch.Tensor:
        """Token distributions (B, N, K): `probs` where repainted, certain of the images' own tokens elsewhere."""
        own = F.one_hot(self.tokens, probs.shape[-1]).to(probs.dtype)
        return torch.where(self.repaint[..., None], probs, own)

    def images_with(self, decoded: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W): `decoded` within BLEND_REACH tokens of a repainted one, the images' own elsewhere."""
        grid, size = math.isqrt(self.tokens.shape[1]), self.pixels.shape[-1]
        near = patch_dilation(self.repaint, grid).view(-1, 1, grid, grid)
        near = near.repeat_interleave(size // grid, 2).repeat_interleave(size // grid, 3)  # (B, 1, H, W)
        return torch.where(near, decoded, self.pixels)


def one_step_inputs(
    generator: OneStepGenerator, kept: Kept, condition: torch.Tensor, noise: ImageNoise
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An edit's input to a one-step generator, in the parts `OneStepGenerator.input_parts` gives: `edit_embeddings`,
    then its layout latent."""
    return edit_embeddings(generator, kept, noise), generator.layout_latent(noise, condition)


def edit_embeddings(generator: OneStepGenerator, kept: Kept, noise: ImageNoise) -> torch.Tensor:
    """The generator's own start at the repainted positions (the mask token or a random one, as it starts a new
    image) and the images' tokens elsewhere, all with its embedding noise (B, N, D): what `token_embeddings` is to a
    new image."""
    start = kept.tokens_with(generator.initial_tokens(noise).to(generator.device))
    return generator.noisy_embeddings(start, noise)


@torch.no_grad()
def fill_one_step(generator: OneStepGenerator, kept: Kept, condition: torch.Tensor, noise: ImageNoise) -> torch.Tensor:
    """One forward pass: the images' tokens (B, N) with the repainted ones drawn anew; the others kept exactly."""
    condition = condition.to(generator.device)
    embeddings = generator.with_latent(*one_step_inputs(generator, kept, condition, noise))
    drawn = generator.tokens_from(generator.logits(embeddings, condition), generator.token_noise(noise))
    return kept.tokens_with(drawn)


@torch.no_grad()
def fill_teacher(
    model: MaskedTransformer,
    kept: Kept,
    condition: torch.Tensor,
    noise: ImageNoise,
    settings: SamplerSettings,
    contrasts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """MaskGIT in the teacher's steps from the images' tokens with the repainted ones masked."""
    masked = kept.tokens_with(torch.full_like(kept.tokens, model.cfg.mask_id))
    return kept.tokens_with(fill(model, masked, condition, noise, settings, contrasts))


def decode_edit(tokenizer, tokens: torch.Tensor, kept: Kept) -> torch.Tensor:
    """Edited tokens (B, N) -> images (B, 3, H, W) in [0, 1], the kept pixels the input's."""
    return kept.images_with(tokenizer.decode_indices(tokens))


class EditsByFilling:
    """Editing for a pipeline that can `fill` what an edit repaints (its `fill(kept, condition, seeds, steps)`, with
    its `tokenizer` and `device`): the same for a teacher, in its steps, and a one-step model, in one pass.

    Which tokens a pixel mask or a strength repaints is the pipeline's to say (`repaint_from_mask`,
    `repaint_at_strength`), so that a server asks the model it edits with; here they are softdimo's rules."""

    def repaint_from_mask(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Pixel masks (B, H, W), True where to repaint -> the tokens to repaint (B, N): every token whose patch holds
        a True pixel."""
        return repaint_from_mask(masks, self.tokenizer.cfg.grid)

    def repaint_at_strength(self, seeds: Sequence[int], strength: float, steps: int | None = None) -> torch.Tensor:
        """Image-to-image's tokens to repaint (B, N), chosen by each seed (`repaint_at_strength`), whatever the
        steps."""
        return repaint_at_strength(seeds, strength, self.tokenizer.cfg.grid**2)

    @torch.inference_mode()
    def edit_tokens(
        self,
        images: np.ndarray,
        repaint: torch.Tensor,
        condition: torch.Tensor,
        seeds: Sequence[int],
        steps: int | None = None,
    ) -> torch.Tensor:
        """uint8 images (B, H, W, 3), the tokens to repaint (B, N) bool (`repaint_from_mask` or
        `repaint_at_strength`), conditioning and one seed per image -> tokens (B, N), the unrepainted ones the images'."""
        return self.fill(Kept.of(self.tokenizer, images, repaint, self.device), condition, seeds, steps)

    @torch.inference_mode()
    def edit(
        self,
        images: np.ndarray,
        repaint: torch.Tensor,
        condition: torch.Tensor,
        seeds: Sequence[int],
        steps: int | None = None,
    ) -> np.ndarray:
        """`edit_tokens` decoded: uint8 images (B, H, W, 3), the input's pixels away from the repainted tokens."""
        kept = Kept.of(self.tokenizer, images, repaint, self.device)
        return to_uint8(decode_edit(self.tokenizer, self.fill(kept, condition, seeds, steps), kept))

    def edit_at_strength(
        self,
        images: np.ndarray,
        strength: float,
        condition: torch.Tensor,
        seeds: Sequence[int],
        steps: int | None = None,
    ) -> np.ndarray:
        """Image-to-image: `edit` of the tokens `repaint_at_strength` chooses for each seed."""
        return self.edit(images, self.repaint_at_strength(seeds, strength, steps), condition, seeds, steps)
