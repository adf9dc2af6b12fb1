"""Rewards behind one small interface; the default is a Shapes image-text alignment model: CLIP-style two
encoders, optionally grounding a relation prompt's objects in the image to score the relation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from softdimo import shapes
from softdimo.text import PromptTokenizer


class Reward(Protocol):
    """A differentiable score of images for their prompts: higher is better.

    Images are (B, 3, H, W) floats in [0, 1] with gradients allowed; prompts are the texts the images
    were asked for (a class-conditional model passes its class names, e.g. "a red circle")."""

    name: str

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # (B,)
        ...


@dataclass(frozen=True)
class AlignmentConfig:
    width: int = 128  # joint embedding width
    channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 conv stage each: three give 8x8 cells of 8 px
    text_layers: int = 2
    text_heads: int = 4
    # False: CLIP-style, the score is the scaled cosine of a pooled image embedding and a pooled prompt
    # embedding. True: for relation prompts it also finds each named object in the feature map and adds how
    # well their places satisfy the relation (pooled embeddings cannot tell "left of" from "right of", nor a
    # prompt from its objects swapped).
    grounding: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AlignmentConfig:
        return cls(**{**d, "channels": tuple(d["channels"])})


class ImageEncoder(nn.Module):
    def __init__(self, cfg: AlignmentConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = 3 + 2  # RGB plus two coordinate channels, so positions are easy to read for relations
        for c in cfg.channels:
            layers += [
                nn.Conv2d(width, c, 3, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
                nn.Conv2d(c, c, 3, stride=2, padding=1),
                nn.SiLU(),
            ]
            width = c
        self.convs = nn.Sequential(*layers)
        self.project = nn.Linear(width * 2, cfg.width)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=images.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.convs(torch.cat([images * 2 - 1, xs, ys], dim=1))  # (B, C, h', w')

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.feature_map(images))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, C, h, w) -> unit image embeddings (B, D)."""
        pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], dim=1)  # (B, 2C)
        return F.normalize(self.project(pooled), dim=-1)


class TextEncoder(nn.Module):
    def __init__(self, cfg: AlignmentConfig, vocab: int, length: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.width)
        self.position = nn.Parameter(torch.randn(1, length, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.text_heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.project = nn.Linear(cfg.width, cfg.width)

    def words(self, ids: torch.Tensor) -> torch.Tensor:
        """Word ids (B, L) -> contextual word states (B, L, D)."""
        return self.encoder(self.embed(ids) + self.position, src_key_padding_mask=ids == 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        padding = ids == 0
        x = self.words(ids)  # (B, L, D)
        keep = (~padding).float()[..., None]
        pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1)
        return F.normalize(self.project(pooled), dim=-1)


# Each relation as (axis, sign): the first object's centre is smaller (-1) or larger (+1) along x (0) or y (1).
_RELATION_AXES = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}


class ObjectGrounding(nn.Module):
    """Where each of the 18 colour-shape objects is in an image: one query per object attends over the feature
    map's cells, and the attention-weighted cell centres are its place, in [-1, 1] image units."""

    def __init__(self, cfg: AlignmentConfig, side: int):
        super().__init__()
        self.keys = nn.Conv2d(cfg.channels[-1], cfg.width, 1)
        self.queries = nn.Parameter(torch.randn(shapes.NUM_CLASSES, cfg.width) * cfg.width**-0.5)
        self.log_sharpness = nn.Parameter(torch.tensor(2.0))  # how steeply a relation's score falls with its margin
        centres = (torch.arange(side) + 0.5) / side * 2 - 1
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("cells", torch.stack([xs.flatten(), ys.flatten()], dim=-1), persistent=False)  # (h*w, 2)

    def positions(self, features: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, C, h, w) -> each object's place (B, 18, 2)."""
        keys = self.keys(features).flatten(2)  # (B, D, h*w)
        attention = (self.queries @ keys * keys.shape[1] ** -0.5).softmax(-1)  # (B, 18, h*w)
        return attention @ self.cells

    def relation_scores(self, positions: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        """Log-likelihood-like score of each relation at given places: positions (B, 18, 2) and relations (B, 4)
        rows (first object, second object, axis, sign; first = -1 where a prompt has no relation) -> (B,).

        As the judge reads a relation: the centres differ by at least 16 px along the axis, in the named
        direction, and by more along that axis than along the other."""
        has = relations[:, 0] >= 0
        rows = torch.arange(len(relations), device=positions.device)
        first = positions[rows, relations[:, 0].clamp_min(0)]  # (B, 2)
        second = positions[rows, relations[:, 1].clamp_min(0)]
        offset = first - second
        axis = relations[:, 2]
        along = relations[:, 3].float() * offset.gather(1, axis[:, None]).squeeze(1)
        across = offset.gather(1, (1 - axis)[:, None]).squeeze(1).abs()
        minimum = 2 * shapes.RELATION_MIN_OFFSET / shapes.CANVAS
        k = self.log_sharpness.exp() * 4
        score = -F.softplus(-k * (along - across)) - F.softplus(-k * (along - minimum))
        return torch.where(has, score, torch.zeros_like(score))


@lru_cache(maxsize=4096)
def _relation_row(prompt: str) -> tuple[int, int, int, int]:
    """A prompt's relation as (first object, second object, axis, sign) class indices; (-1, -1, 0, 0) if none."""
    parsed = shapes.parse_prompt(prompt)
    if parsed.kind != "relation":
        return (-1, -1, 0, 0)
    a, b = parsed.objects
    axis, sign = _RELATION_AXES[parsed.relation]
    return (shapes.class_label(a.color, a.shape), shapes.class_label(b.color, b.shape), axis, int(sign))


def relation_rows(prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Prompts -> (P, 4) long rows for ObjectGrounding.relation_scores."""
    return torch.tensor([_relation_row(p) for p in prompts], dtype=torch.long, device=device)


class AlignmentModel(nn.Module):
    """CLIP-style: cosine similarity of image and prompt embeddings, times a learned temperature; with
    `grounding`, plus the score of a relation prompt's relation read from where its two objects are."""

    def __init__(self, cfg: AlignmentConfig, prompt_tokenizer: PromptTokenizer, image_size: int = 64):
        super().__init__()
        self.cfg = cfg
        self.prompt_tokenizer = prompt_tokenizer
        self.image = ImageEncoder(cfg)
        self.text = TextEncoder(cfg, prompt_tokenizer.size, prompt_tokenizer.length)
        self.log_scale = nn.Parameter(torch.tensor(2.0))
        if cfg.grounding:
            self.grounding = ObjectGrounding(cfg, side=image_size // 2 ** len(cfg.channels))  # each stage halves

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text(self.prompt_tokenizer.encode(prompts).to(self.log_scale.device))

    def similarity(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) score of each image for its own prompt: a cosine in [-1, 1]; with grounding, the scaled cosine
        plus the relation's score (a logit-like number, higher is better)."""
        if not self.cfg.grounding:
            return (self.image(images) * self.encode_prompts(prompts)).sum(-1)
        features = self.image.feature_map(images)
        cosine = (self.image.embed(features) * self.encode_prompts(prompts)).sum(-1)
        relations = relation_rows(prompts, images.device)
        return self.log_scale.exp() * cosine + self.grounding.relation_scores(
            self.grounding.positions(features), relations
        )

    def logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * image_embeddings @ text_embeddings.T


class AlignmentReward:
    """The reward of an AlignmentModel: its image-prompt score (a cosine, about 0.3 unrelated and near 1 aligned;
    or, with grounding, the scaled cosine plus the relation's score)."""

    def __init__(self, model: AlignmentModel, name: str = "shapes-clip"):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = name

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.similarity(images, prompts)
