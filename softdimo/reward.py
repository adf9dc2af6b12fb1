"""Rewards behind one small interface; the default is a Shapes image-text alignment model: CLIP-style two
encoders, optionally with a joint transformer over image patches and prompt words that scores each pair."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
    channels: tuple[int, ...] = (32, 64, 128)
    text_layers: int = 2
    text_heads: int = 4
    # 0: CLIP-style, the score is the cosine of a pooled image embedding and a pooled prompt embedding. > 0:
    # this many joint transformer layers also read the image's feature map and the prompt's words together, so
    # the score can bind "red circle" and "left of" to places; the score is then the log-odds of a match, the
    # scaled cosine plus the joint layers' logit (what the pooled embeddings know is learned fast; the joint
    # layers add what they cannot tell apart, relations and swapped objects).
    joint_layers: int = 0

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
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, stride=2, padding=1), nn.SiLU()]
            width = c
        self.convs = nn.Sequential(*layers)
        self.project = nn.Linear(width * 2, cfg.width)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=images.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.convs(torch.cat([images * 2 - 1, xs, ys], dim=1))  # (B, C, h', w')

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.feature_map(images)
        pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], dim=1)  # (B, 2C)
        return F.normalize(self.project(pooled), dim=-1)


class TextEncoder(nn.Module):
    def __init__(self, cfg: AlignmentConfig, vocab: int, length: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.width)
        self.position = nn.Parameter(torch.randn(1, length, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.text_heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True)
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


class JointScorer(nn.Module):
    """A transformer over an image's feature-map cells and a prompt's words together -> one match logit."""

    def __init__(self, cfg: AlignmentConfig, cells: int):
        super().__init__()
        self.cells = nn.Linear(cfg.channels[-1], cfg.width)
        self.cell_position = nn.Parameter(torch.randn(1, cells, cfg.width) * 0.02)
        self.kind = nn.Parameter(torch.randn(2, cfg.width) * 0.02)  # image cell or word
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.text_heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.joint_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, 1))

    def forward(self, features: torch.Tensor, words: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, C, h, w), word states (B, L, D) and their padding (B, L) -> logits (B,)."""
        cells = self.cells(features.flatten(2).transpose(1, 2)) + self.cell_position + self.kind[0]  # (B, h*w, D)
        x = torch.cat([cells, words + self.kind[1]], dim=1)
        mask = torch.cat([torch.zeros_like(padding[:, :1]).expand(-1, cells.shape[1]), padding], dim=1)
        x = self.encoder(x, src_key_padding_mask=mask)
        keep = (~mask).float()[..., None]
        return self.head((x * keep).sum(1) / keep.sum(1)).squeeze(-1)


class AlignmentModel(nn.Module):
    """CLIP-style: cosine similarity of image and prompt embeddings, times a learned temperature; with
    `joint_layers`, a joint transformer scores each image-prompt pair instead (a match log-odds)."""

    def __init__(self, cfg: AlignmentConfig, prompt_tokenizer: PromptTokenizer, image_size: int = 64):
        super().__init__()
        self.cfg = cfg
        self.prompt_tokenizer = prompt_tokenizer
        self.image = ImageEncoder(cfg)
        self.text = TextEncoder(cfg, prompt_tokenizer.size, prompt_tokenizer.length)
        self.log_scale = nn.Parameter(torch.tensor(2.0))
        if cfg.joint_layers:
            side = image_size // 2 ** len(cfg.channels)  # each conv stage halves the image
            self.joint = JointScorer(cfg, side * side)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text(self.prompt_tokenizer.encode(prompts).to(self.log_scale.device))

    def similarity(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) score of each image for its own prompt: a cosine in [-1, 1], or a match log-odds when joint."""
        if self.cfg.joint_layers:
            return self.joint_scores(self.image.feature_map(images), prompts)
        return (self.image(images) * self.encode_prompts(prompts)).sum(-1)

    def joint_scores(self, features: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Match log-odds (B,) of feature maps (B, C, h, w) with prompts (one per map)."""
        ids = self.prompt_tokenizer.encode(prompts).to(features.device)
        pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], dim=1)
        cosine = (F.normalize(self.image.project(pooled), dim=-1) * self.text(ids)).sum(-1)
        return self.log_scale.exp() * cosine + self.joint(features, self.text.words(ids), ids == 0)

    def logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * image_embeddings @ text_embeddings.T


class AlignmentReward:
    """The reward of an AlignmentModel: its image-prompt score (a cosine, about 0.3 unrelated and near 1 aligned;
    or, with joint layers, the log-odds that the image shows the prompt)."""

    def __init__(self, model: AlignmentModel, name: str = "shapes-clip"):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = name

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.similarity(images, prompts)
