"""VQ tokenizer: images <-> token grids. Encoders: a patch dictionary (nearest prototype) or an FSQ-rounded
conv / per-patch encoder; a conv decoder over code vectors ending in palette logits."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from softdimo import shapes


@dataclass(frozen=True)
class TokenizerConfig:
    image_size: int = 64
    downsample: int = 8  # image side / token grid side; a power of two, at least 4
    levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ levels per code dimension: codebook size is their product
    stem: int = 4  # the first pixel_unshuffle factor; later stages halve with strided convs
    channels: tuple[int, ...] = (64, 128)  # width at the stem resolution, then after each halving
    blocks: int = 2  # residual blocks per resolution in the decoder (one in the conv encoder)
    # "dictionary": a token is the index of the dictionary prototype nearest to its own patch's pixels (no FSQ);
    # the dictionary holds the patches the world draws, so equal patches get equal codes and codes are exact.
    # "conv": a convolutional encoder whose receptive field reaches beyond the patch, rounded to the FSQ grid;
    # "patch": a per-patch MLP rounded to the FSQ grid. The decoder sees neighbouring codes in every case.
    encoder: str = "conv"
    encoder_width: int = 256  # hidden width of the patch encoder's per-patch MLP
    dictionary_size: int = 256  # codes of a dictionary tokenizer (its training sets it to the patches found)
    dictionary_dim: int = 8  # dimension of a dictionary tokenizer's learned code vectors (the decoder's input)
    # Output colours: decoded pixels are a softmax over these (background first). Empty means plain RGB.
    palette: tuple[tuple[int, int, int], ...] = field(
        default_factory=lambda: ((0, 0, 0), *map(tuple, shapes.PALETTE.tolist()))
    )

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def codebook_size(self) -> int:
        return self.dictionary_size if self.encoder == "dictionary" else math.prod(self.levels)

    @property
    def code_dim(self) -> int:
        """Dimension of a code vector: what the decoder reads at each token."""
        return self.dictionary_dim if self.encoder == "dictionary" else len(self.levels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerConfig:
        d = dict(d)
        d["levels"] = tuple(d["levels"])
        d["channels"] = tuple(d["channels"])
        d["palette"] = tuple(tuple(c) for c in d["palette"])
        return cls(**d)


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _codebook(levels: tuple[int, ...]) -> torch.Tensor:
    """All FSQ grid points, (prod(levels), len(levels)), in [-1, 1]; row k is the code of token k."""
    axes = [torch.linspace(-1, 1, n) for n in levels]
    return torch.tensor(list(itertools.product(*[a.tolist() for a in axes])), dtype=torch.float32)


class PatchEncoder(nn.Module):
    """Per-patch MLP (1x1 convolutions over the unshuffled patch): a token sees only its own pixels."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        width = cfg.encoder_width
        self.net = nn.Sequential(
            nn.PixelUnshuffle(cfg.downsample),
            nn.Conv2d(3 * cfg.downsample**2, width, 1),
            nn.SiLU(),
            nn.Conv2d(width, width, 1),
            nn.SiLU(),
            nn.Conv2d(width, width, 1),
            nn.SiLU(),
            nn.Conv2d(width, len(cfg.levels), 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, d, g, g)


class DictionaryEncoder(nn.Module):
    """Nearest prototype: each token is the dictionary entry closest (in pixels) to its own patch."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(cfg.downsample)
        self.register_buffer("prototypes", torch.zeros(cfg.dictionary_size, 3 * cfg.downsample**2))  # (K, 3*p*p)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> flattened patches (B, g*g, 3*p*p), in the order of the token grid."""
        return self.unshuffle(images).flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patches(images)
        p = self.prototypes
        distances = (x * x).sum(-1, keepdim=True) - 2 * x @ p.T + (p * p).sum(-1)  # (B, N, K)
        return distances.argmin(-1)  # (B, N) token ids


class ConvEncoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        stages = int(math.log2(cfg.downsample // cfg.stem))
        widths = cfg.channels
        layers: list[nn.Module] = [nn.PixelUnshuffle(cfg.stem), nn.Conv2d(3 * cfg.stem**2, widths[0], 3, padding=1)]
        for i in range(stages):
            layers += [ResBlock(widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
        layers += [ResBlock(widths[stages]), nn.GroupNorm(8, widths[stages]), nn.SiLU()]
        layers += [nn.Conv2d(widths[stages], len(cfg.levels), 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, d, g, g)


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        stages = int(math.log2(cfg.downsample // cfg.stem))
        widths = cfg.channels
        out_channels = len(cfg.palette) if cfg.palette else 3
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[stages], 3, padding=1)]
        for i in reversed(range(stages)):
            layers += [ResBlock(widths[i + 1]) for _ in range(cfg.blocks)]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i + 1], widths[i], 3, padding=1)]
        layers += [ResBlock(widths[0]) for _ in range(cfg.blocks)]
        layers += [nn.GroupNorm(8, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], out_channels * cfg.stem**2, 1)]
        layers += [nn.PixelShuffle(cfg.stem)]
        self.net = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net(codes)  # (B, colours or 3, H, W) logits


ENCODERS = {"dictionary": DictionaryEncoder, "patch": PatchEncoder, "conv": ConvEncoder}


class VQTokenizer(nn.Module):
    """Images in [0, 1] (B, 3, H, W) <-> token grids (B, g*g) over a codebook of `codebook_size` codes."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {cfg.encoder!r}; use one of {', '.join(ENCODERS)}")
        self.encoder = ENCODERS[cfg.encoder](cfg)
        self.decoder = Decoder(cfg)
        if cfg.encoder == "dictionary":  # learned code vectors, one per prototype
            self.codebook = nn.Parameter(torch.randn(cfg.dictionary_size, cfg.dictionary_dim))  # (K, d)
        else:  # the fixed FSQ grid
            self.register_buffer("codebook", _codebook(cfg.levels), persistent=False)  # (K, d)
        self.register_buffer("_levels", torch.tensor(cfg.levels, dtype=torch.float32), persistent=False)
        self.register_buffer("_colors", torch.tensor(cfg.palette, dtype=torch.float32) / 255.0, persistent=False)
        # Mixed radix: token id = sum(level_index_i * radix_i), matching itertools.product order.
        radix = [math.prod(cfg.levels[i + 1 :]) for i in range(len(cfg.levels))]
        self.register_buffer("_radix", torch.tensor(radix, dtype=torch.long), persistent=False)
        # Convolution kernels pick their algorithm by batch size, and with it the rounding. Decoding in
        # chunks of one fixed size (the last padded) makes an image's pixels independent of its batch.
        self.decode_chunk: int | None = None

    # -- quantisation
    def _quantise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, d, g, g) -> (straight-through codes, token ids (B, g*g))."""
        top = self._levels - 1  # (d,) largest level index per dimension
        z = latents.movedim(1, -1)  # (B, g, g, d)
        continuous = (torch.tanh(z) + 1) / 2 * top  # in (0, top)
        index = torch.round(continuous)
        index_st = continuous + (index - continuous).detach()  # gradients pass straight through the rounding
        codes = index_st / top * 2 - 1  # in [-1, 1], the grid of `codebook`
        tokens = (index.long() * self._radix).sum(-1).flatten(1)  # (B, g*g)
        return codes.movedim(-1, 1), tokens

    def _grid(self, embeddings: torch.Tensor) -> torch.Tensor:
        g = self.cfg.grid
        return embeddings.transpose(1, 2).reshape(embeddings.shape[0], -1, g, g)  # (B, d, g, g)

    def _pixels(self, logits: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image in [0, 1]: the expected palette colour, or sigmoid RGB without a palette."""
        if self.cfg.palette:
            return torch.einsum("bkhw,kc->bchw", logits.softmax(1), self._colors)
        return torch.sigmoid(logits)

    # -- public interface
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> tokens (B, g*g)."""
        if self.cfg.encoder == "dictionary":
            return self.encoder(images)
        return self._quantise(self.encoder(images * 2 - 1))[1]

    def decode_indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, g*g) -> images (B, 3, H, W) in [0, 1]; bit for bit the same whatever the batch with
        `decode_chunk`."""
        n = tokens.shape[0]
        chunk = self.decode_chunk or max(n, 1)  # without a chunk size, the whole batch at once
        padded = torch.cat([tokens, tokens[:1].expand((-n) % chunk, -1)])
        codes = self._grid(self.codebook[padded])
        return torch.cat([self._pixels(self.decoder(part)) for part in codes.split(chunk)])[:n]

    def decode_soft(self, probs: torch.Tensor) -> torch.Tensor:
        """Token distributions (B, g*g, K) -> images, differentiably: decodes the expected code `probs @ codebook`."""
        return self._pixels(self.decoder(self._grid(probs @ self.codebook)))

    def reconstruction_loss(
        self, images: torch.Tensor, targets: torch.Tensor | None = None, token_noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Training loss for a batch of images in [0, 1]; `targets` are palette indices (B, H, W) with a palette.

        A dictionary tokenizer's decoder can also learn to repair tokens: `token_noise` (B, g*g) holds a
        replacement code where a token is to be corrupted and -1 elsewhere; the target stays the clean image."""
        if self.cfg.encoder == "dictionary":
            tokens = self.encode(images)
            if token_noise is not None:
                tokens = torch.where(token_noise >= 0, token_noise, tokens)
            codes = self._grid(self.codebook[tokens])
        else:
            codes, _ = self._quantise(self.encoder(images * 2 - 1))
        logits = self.decoder(codes)
        if self.cfg.palette:
            return F.cross_entropy(logits, targets)
        return F.l1_loss(torch.sigmoid(logits), images)


def to_tensor(images) -> torch.Tensor:
    """uint8 (B, H, W, 3) array -> float (B, 3, H, W) in [0, 1]."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0


# How uint8 images reach host memory; softdimo.runtime routes the copy through pinned memory when asked.
HOST_COPY: ContextVar[Callable[[torch.Tensor], torch.Tensor]] = ContextVar("HOST_COPY", default=torch.Tensor.cpu)


def to_uint8(images: torch.Tensor):
    """float (B, 3, H, W) in [0, 1] -> uint8 numpy (B, H, W, 3)."""
    return HOST_COPY.get()((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)).numpy()
