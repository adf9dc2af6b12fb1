"""Editing an image: its tokens are kept where the edit leaves them, and the rest (the repainted tokens) are filled
in by a one-step generator in one forward pass or by a teacher in its MaskGIT steps (inpainting, image-to-image)."""

from __future__ import annotations

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
    (B, tokens). The choice draws from a stream of its own, so it is the same for a teacher and a one-step model."""
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


def decode_edit(tokenizer, tokens: torch.Tensor, images: np.ndarray, repaint: torch.Tensor) -> np.ndarray:
    """Edited tokens (B, N) -> uint8 images (B, H, W, 3): the decoder's pixels in the patches within BLEND_REACH of
    a repainted token, the input `images`' pixels everywhere else.

    Kept tokens alone do not keep pixels: the decoder's normalisation and its 3x3 convolutions reach across the
    whole grid, so a repainted token moves pixels of distant kept patches a little; the input's own pixels there
    also spare the kept part the tokenizer's reconstruction error."""
    decoded = to_uint8(tokenizer.decode_indices(tokens))
    grid, size = tokenizer.cfg.grid, tokenizer.cfg.image_size
    blended = patch_dilation(repaint.cpu(), grid).view(-1, grid, grid)
    pixels = blended.repeat_interleave(size // grid, 1).repeat_interleave(size // grid, 2).numpy()  # (B, H, W)
    return np.where(pixels[..., None], decoded, images)


@torch.no_grad()
def fill_one_step(
    generator: OneStepGenerator, tokens: torch.Tensor, repaint: torch.Tensor, condition: torch.Tensor,
    noise: ImageNoise,
) -> torch.Tensor:  # fmt: skip
    """One forward pass: image tokens (B, N) with the `repaint` (B, N) ones filled in; the others kept exactly.

    The generator's input is its own start at the repainted positions (the mask token or a random one, as it
    starts a new image) and the image's tokens elsewhere, all with its embedding noise; then its layout latent."""
    device = generator.device
    tokens, repaint, condition = tokens.to(device), repaint.to(device), condition.to(device)
    start = torch.where(repaint, generator.initial_tokens(noise).to(device), tokens)
    embeddings = generator.noisy_embeddings(start, noise)  # (B, N, D)
    embeddings = generator.with_latent(embeddings, generator.layout_latent(noise, condition))
    drawn = generator.tokens_from(generator.logits(embeddings, condition), generator.token_noise(noise))
    return torch.where(repaint, drawn, tokens)


@torch.no_grad()
def fill_teacher(
    model: MaskedTransformer, tokens: torch.Tensor, repaint: torch.Tensor, condition: torch.Tensor, noise: ImageNoise,
    settings: SamplerSettings, contrasts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """MaskGIT in the teacher's steps from the image's tokens with the `repaint` (B, N) ones masked."""
    device = condition.device
    tokens, repaint = tokens.to(device), repaint.to(device)
    filled = fill(model, torch.where(repaint, model.cfg.mask_id, tokens), condition, noise, settings, contrasts)
    return torch.where(repaint, filled, tokens)
