"""A reward for real images: transformers' CLIPModel, from a local folder, scores how well an image shows its prompt.

A CLIP reward bundle is softdimo's config.json and manifest.json beside `clip/`, the folder CLIPModel's and its
tokenizer's `save_pretrained` write (with the image processor's `preprocessor_config.json` when there is one)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from softdimo.bundle import Bundle, BundleError, seal_folder

ARCHITECTURE = "transformers-clip"
FOLDER = "clip"
# OpenAI CLIP's pixel statistics, used when the folder has no image processor config
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPReward:
    """The cosine similarity of CLIP's image and text embeddings, differentiable in the images.

    Images (B, 3, H, W) in [0, 1] are resized (bicubic) to CLIP's input size and normalised as its image processor
    does; a square image is all a generator makes here, so no centre crop is needed."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.size = model.config.vision_config.image_size
        self._mean = torch.tensor(mean).view(1, 3, 1, 1)
        self._std = torch.tensor(std).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        pixels = F.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False)
        pixels = (pixels - self._mean.to(images.device)) / self._std.to(images.device)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        limit = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        ids = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt").to(
            self.device
        )
        pooled = self.model.text_model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) cosine of each image with its own prompt, in [-1, 1]."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)


def load_clip_reward(bundle: Bundle, device: torch.device | str = "cpu") -> CLIPReward:
    try:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    except ImportError as exc:
        raise BundleError("a CLIP reward needs the optional dependencies: pip install -e '.[diffusers]'") from exc
    folder = bundle.path / bundle.config.get("model", FOLDER)
    if not folder.is_dir():
        raise BundleError(f"{bundle.path}: no {folder.name}/ folder with the CLIP model")
    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    mean, std = CLIP_MEAN, CLIP_STD
    if (folder / "preprocessor_config.json").exists():
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        mean, std = processor.image_mean, processor.image_std
    return CLIPReward(model.to(device), tokenizer, name=bundle.config["name"], mean=mean, std=std)


def write_clip_bundle(folder: str | Path, *, source: str | Path, name: str) -> Path:
    """A reward bundle holding a copy of `source`, a folder a CLIPModel (and its tokenizer) was saved to."""
    folder, source = Path(folder), Path(source)
    if not (source / "config.json").is_file():
        raise BundleError(f"{source}: not a saved CLIPModel (no config.json)")
    shutil.copytree(source, folder / FOLDER, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
    return seal_folder(folder, {"name": name, "kind": "reward", "architecture": ARCHITECTURE, "model": FOLDER})
