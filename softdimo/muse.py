"""diffusers' MUSE family (aMUSEd and models built on its parts) as softdimo parts: the VQModel as a tokenizer,
the UVit2DModel with its CLIP text encoder as a masked transformer, AmusedPipeline's sampler, and bundles.

A MUSE bundle is the folder diffusers' `save_pretrained` writes (`vqvae/`, `transformer/`, `text_encoder/`,
`tokenizer/`, `scheduler/`, `model_index.json`) plus softdimo's `config.json` and `manifest.json`; diffusers reads
it as it is. Needs the `diffusers` extra (diffusers, transformers), imported only when a bundle is loaded."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from softdimo import shapes
from softdimo.bundle import CONFIG, MANIFEST, Bundle, BundleError, seal_folder
from softdimo.conditioning import ConditionError, ConditionerBase
from softdimo.editing import EditsByFilling, Kept, image_tokens
from softdimo.prompt_images import generate_for_prompts
from softdimo.seeding import ImageNoise
from softdimo.vq import to_uint8

ARCHITECTURE = "diffusers-muse"
COPIED = (
    "vqvae",
    "text_encoder",
    "tokenizer",
    "scheduler",
    "model_index.json",
)  # what a student shares with its teacher


def require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise BundleError(
            "diffusers MUSE models need the optional dependencies: pip install -e '.[diffusers]'"
        ) from exc


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class MicroConditioning:
    """The extra numbers AmusedPipeline feeds its transformer with every call (SDXL-style micro-conditioning)."""

    aesthetic_score: float = 6.0
    crop: tuple[int, int] = (0, 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MicroConditioning:
        return cls(aesthetic_score=d.get("aesthetic_score", 6.0), crop=tuple(d.get("crop", (0, 0))))


@dataclass(frozen=True)
class MuseConfig:
    """What softdimo needs to know of a MUSE transformer, read from the diffusers components' own configs."""

    codebook_size: int  # logits per position (the VQ codebook)
    mask_id: int  # the scheduler's mask token id
    grid: int  # the token grid's side
    width: int  # channels of an input embedding (the output of `UVit2DModel.embed`)
    state_width: int  # channels of the transformer layers' hidden states (the discriminator heads' input)
    depth: int  # transformer layers
    text_length: int  # CLIP token ids per prompt, padded
    image_size: int  # pixels per side
    schedule: str  # the scheduler's masking schedule: cosine or linear
    micro: MicroConditioning = MicroConditioning()
    conditioning: str = "text"
    latent_dim: int = 0  # a MUSE network reads no layout latent (TransformerConfig.latent_dim)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class MuseSamplerSettings:
    steps: int = 12
    guidance: float = 10.0  # diffusers' guidance_scale: uncond + guidance * (cond - uncond), applied when > 1
    temperature: tuple[float, float] = (2.0, 0.0)  # Gumbel noise on confidences, linear from the first to the second

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MuseSamplerSettings:
        return cls(**{k: tuple(v) if k == "temperature" else v for k, v in d.items()})  # JSON holds a list


# ------------------------------------------------------------------ the transformer


class TextStates(NamedTuple):
    pooled: torch.Tensor  # (B, P) the CLIP text projection
    hidden: torch.Tensor  # (B, L, H) the penultimate layer's states, what the transformer cross-attends to


class MuseTransformer(nn.Module):
    """A UVit2DModel and its CLIP text encoder behind softdimo's masked-transformer interface.

    Conditioning is CLIP token ids (B, L). An input embedding is the output of the UVit's own `embed` (token
    embedding, RMSNorm, 1x1 conv), where Di[M]O puts its noise for this family; a soft embedding mixes the normed
    token embeddings by the probabilities before the (linear) conv, which is the expected embedding exactly."""

    def __init__(self, *, uvit: nn.Module, text_encoder: nn.Module, null_ids: torch.Tensor, cfg: MuseConfig):
        super().__init__()
        self.uvit = uvit
        self.text_encoder = text_encoder
        self.register_buffer("null_ids", null_ids.long(), persistent=False)  # (1, L): the empty prompt
        self.cfg = cfg

    def null_condition(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """The empty prompt's ids: the unconditional input of classifier-free guidance (AmusedPipeline's default)."""
        return self.null_ids.expand(batch, -1).to(device or self.null_ids.device)

    def encode_text(self, ids: torch.Tensor) -> TextStates:
        out = self.text_encoder(ids, return_dict=True, output_hidden_states=True)
        return TextStates(out.text_embeds, out.hidden_states[-2])

    def input_parameters(self) -> list[nn.Parameter]:
        """What a student keeps from its teacher: the embedding layer and the text encoder."""
        return [*self.uvit.embed.parameters(), *self.text_encoder.parameters()]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N), mask id allowed -> input embeddings (B, N, D)."""
        b = tokens.shape[0]
        return self.uvit.embed(tokens.view(b, self.cfg.grid, self.cfg.grid)).flatten(2).transpose(1, 2)

    def soft_embed(self, probs: torch.Tensor) -> torch.Tensor:
        """Distributions over the codebook (B, N, K) -> expected input embeddings (B, N, D)."""
        embed = self.uvit.embed
        normed = embed.layer_norm(embed.embeddings.weight[: self.cfg.codebook_size])  # (K, C)
        mixed = (probs @ normed).transpose(1, 2)  # (B, C, N)
        return embed.conv(mixed.reshape(*mixed.shape[:2], self.cfg.grid, self.cfg.grid)).flatten(2).transpose(1, 2)

    def mask_embedding(self) -> torch.Tensor:
        ids = torch.full((1, self.cfg.tokens), self.cfg.mask_id, dtype=torch.long, device=self.null_ids.device)
        return self.embed(ids)[0, 0]

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N) and CLIP ids (B, L) -> logits (B, N, K)."""
        return self.forward_embeddings(self.embed(tokens), condition)

    def forward_embeddings(self, embeddings: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, N, D) and CLIP ids (B, L) -> logits (B, N, K)."""
        return self.embedding_logits(embeddings, self.encode_text(condition))

    def token_logits(self, tokens: torch.Tensor, text: TextStates) -> torch.Tensor:
        """Token ids (B, N) and encoded text -> logits (B, N, K); the sampler encodes its prompts once."""
        return self.embedding_logits(self.embed(tokens), text)

    def embedding_logits(self, embeddings: torch.Tensor, text: TextStates) -> torch.Tensor:
        logits, _ = self._run(embeddings, text, layers=())
        return logits.flatten(2).transpose(1, 2)  # (B, K, h, w) -> (B, N, K)

    def hidden_states(
        self, embeddings: torch.Tensor, condition: torch.Tensor, layers: tuple[int, ...]
    ) -> list[torch.Tensor]:
        """The states (B, N', state_width) after each transformer layer in `layers` (0-based)."""
        return self._run(embeddings, self.encode_text(condition), layers=layers)[1]

    def _run(
        self, embeddings: torch.Tensor, text: TextStates, layers: tuple[int, ...]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """UVit2DModel.forward from its embedding on, op for op; stops after the last of `layers` when there are any."""
        from diffusers.models.embeddings import get_timestep_embedding

        uvit, cfg = self.uvit, self.cfg
        b = embeddings.shape[0]
        hidden = uvit.encoder_proj_layer_norm(uvit.encoder_proj(text.hidden))
        micro = torch.tensor(
            [cfg.image_size, cfg.image_size, *cfg.micro.crop, cfg.micro.aesthetic_score],
            device=hidden.device,
            dtype=hidden.dtype,
        )[None].expand(b, -1)
        micro = get_timestep_embedding(
            micro.flatten(), uvit.config.micro_cond_encode_dim, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        pooled = torch.cat([text.pooled, micro.reshape((b, -1))], dim=1).to(dtype=uvit.dtype)
        pooled = uvit.cond_embed(pooled).to(hidden.dtype)

        x = embeddings.transpose(1, 2).reshape(b, -1, cfg.grid, cfg.grid)  # (B, D, h, w)
        x = uvit.down_block(x, pooled_text_emb=pooled, encoder_hidden_states=hidden, cross_attention_kwargs=None)
        _, channels, height, width = x.shape
        x = uvit.project_to_hidden(
            uvit.project_to_hidden_norm(x.permute(0, 2, 3, 1).reshape(b, height * width, channels))
        )
        states = []
        for i, layer in enumerate(uvit.transformer_layers):
            x = layer(
                x,
                encoder_hidden_states=hidden,
                cross_attention_kwargs=None,
                added_cond_kwargs={"pooled_text_emb": pooled},
            )
            if i in layers:
                states.append(x)
                if len(states) == len(layers):
                    return None, states
        x = uvit.project_from_hidden(uvit.project_from_hidden_norm(x))
        x = x.reshape(b, height, width, channels).permute(0, 3, 1, 2)
        x = uvit.up_block(x, pooled_text_emb=pooled, encoder_hidden_states=hidden, cross_attention_kwargs=None)
        return uvit.mlm_layer(x), states

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.uvit.parameters())


# ------------------------------------------------------------------ the tokenizer


@dataclass(frozen=True)
class MuseImageConfig:
    image_size: int
    grid: int
    codebook_size: int


class MuseTokenizer(nn.Module):
    """A VQModel behind softdimo's tokenizer interface: images in [0, 1] (B, 3, H, W) <-> token grids (B, N)."""

    def __init__(self, vqvae: nn.Module, cfg: MuseImageConfig):
        super().__init__()
        self.vqvae = vqvae
        self.cfg = cfg
        self.decode_chunk: int | None = None  # as VQTokenizer: a fixed chunk makes an image's pixels batch-independent

    @property
    def codebook(self) -> torch.Tensor:
        return self.vqvae.quantize.embedding.weight  # (K, C)

    def _pixels(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, C, h, w) -> images in [0, 1]: the body of VQModel.decode after its codebook lookup."""
        vq = self.vqvae
        decoded = vq.decoder(vq.post_quant_conv(codes), codes if vq.config.norm_type == "spatial" else None)
        return decoded.clip(0, 1)

    def _codes(self, tokens: torch.Tensor) -> torch.Tensor:
        b, g = tokens.shape[0], self.cfg.grid
        return self.vqvae.quantize.get_codebook_entry(tokens.reshape(-1), (b, g, g, self.codebook.shape[1]))

    def decode_indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N) -> images (B, 3, H, W), as AmusedPipeline decodes them."""
        n = tokens.shape[0]
        chunk = self.decode_chunk or max(n, 1)
        padded = torch.cat([tokens, tokens[:1].expand((-n) % chunk, -1)])
        return torch.cat([self._pixels(self._codes(part)) for part in padded.split(chunk)])[:n]

    def decode_soft(self, probs: torch.Tensor) -> torch.Tensor:
        """Token distributions (B, N, K) -> images, differentiably: the decoder on the expected code
        `probs @ codebook`."""
        b, g = probs.shape[0], self.cfg.grid
        codes = (probs @ self.codebook).view(b, g, g, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)
        return self._pixels(codes)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], resized to the model's size when they differ -> tokens (B, N)."""
        size = self.cfg.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        latents = self.vqvae.encode(images).latents
        return self.vqvae.quantize(latents)[2][2].view(images.shape[0], -1)


# ------------------------------------------------------------------ conditioning


@dataclass(frozen=True)
class TextConditioner(ConditionerBase):
    """Free-text prompts through the model's CLIP tokenizer: any text that fits its `length` ids."""

    tokenizer: Any  # a transformers CLIPTokenizer
    length: int
    kinds: tuple[str, ...] = shapes.KINDS  # the Shapes prompt kinds a trainer draws when given no prompts of its own
    conditioning: str = "text"
    grammar: str | None = None
    num_classes: int = 0

    @property
    def class_names(self) -> list[str]:
        return []

    def prompt_pattern(self) -> str | None:
        """No grammar: any text whose CLIP tokens fit (a length in tokens is no regular expression)."""
        return None

    def check_prompt(self, prompt: str) -> None:
        count = len(self.tokenizer(prompt).input_ids)
        if count > self.length:
            raise ConditionError(
                f"prompt is {count} CLIP tokens long (start and end included); this model reads at most {self.length}"
            )

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> CLIP ids (B, L), padded as AmusedPipeline pads them."""
        for p in prompts:
            self.check_prompt(p)
        return self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.length, return_tensors="pt"
        ).input_ids

    def encode_labels(self, labels: Sequence[int]) -> torch.Tensor:
        raise ConditionError("this model is text-conditional: give prompt, not class_label")


# ------------------------------------------------------------------ sampling


def masked_share(step: int, steps: int, schedule: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """AmusedScheduler's share of the tokens still masked after `step` (0-based) of `steps`, (1, 1), computed as it
    computes it."""
    ratio = (torch.tensor([[step]], device=device) + 1) / steps
    if schedule == "cosine":
        return torch.cos(ratio * math.pi / 2)
    if schedule == "linear":
        return 1 - ratio
    raise ValueError(f"unknown masking schedule {schedule!r}")


def unmask_step(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    step: int,
    steps: int,
    temperature: torch.Tensor,
    schedule: str,
    mask_id: int,
    generator: torch.Generator,
    start_share: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """One MaskGIT step for one image: logits (1, N, K), tokens (1, N) -> tokens. It draws what AmusedScheduler.step
    draws from `generator`, in the same order and with the same arithmetic, so the tokens are the same.
    `start_share` scales the schedule's masked share (the scheduler's `starting_mask_ratio`: inpainting's share of
    masked tokens)."""
    unknown = tokens == mask_id
    probs = logits.softmax(dim=-1)
    drawn = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator)[:, 0].view(*probs.shape[:-1])
    drawn = torch.where(unknown, drawn, tokens)
    if step == steps - 1:
        return drawn
    count = (tokens.shape[1] * (start_share * masked_share(step, steps, schedule, tokens.device))).floor()
    count = torch.min(unknown.sum(dim=-1, keepdim=True) - 1, count)  # never more than were masked
    count = torch.max(torch.tensor([1], device=tokens.device), count)  # at least one
    confidence = torch.gather(probs, -1, drawn[:, :, None])[:, :, 0]
    confidence = torch.where(unknown, confidence, torch.finfo(confidence.dtype).max)  # given tokens stay
    uniform = torch.zeros_like(confidence).uniform_(0, 1, generator=generator)
    gumbel = -torch.log((-torch.log(uniform.clamp(1e-20))).clamp(1e-20))
    noisy = torch.log(confidence.clamp(1e-20)) + temperature * gumbel
    cut = torch.gather(torch.sort(noisy, dim=-1).values, 1, count.long())
    return torch.where(noisy < cut, mask_id, drawn)


@torch.no_grad()
def unmask_from(
    model: MuseTransformer,
    tokens: torch.Tensor,
    condition: torch.Tensor,
    noise: ImageNoise,
    settings: MuseSamplerSettings,
    *,
    first_step: int,
    schedule: str,
    start_shares: torch.Tensor | None = None,
) -> torch.Tensor:
    """AmusedScheduler's steps `first_step`, ..., `settings.steps - 1` on tokens (B, N), the mask id where a token is
    to be drawn -> tokens (B, N), each image from its own generator, with classifier-free guidance as AmusedPipeline
    applies it. `start_shares` (B,): each image's `start_share` (None: 1)."""
    b, device = len(noise), condition.device
    guided = settings.guidance > 1.0
    text = model.encode_text(condition)
    if guided:  # the empty prompt is encoded on its own, as the pipeline does, then put first
        null = model.encode_text(model.null_condition(b, device))
        text = TextStates(torch.cat([null.pooled, text.pooled]), torch.cat([null.hidden, text.hidden]))
    temperatures = torch.linspace(*settings.temperature, settings.steps, device=device)
    for step in range(first_step, settings.steps):
        logits = model.token_logits(torch.cat([tokens, tokens]) if guided else tokens, text)
        if guided:
            uncond, cond = logits.chunk(2)
            logits = uncond + settings.guidance * (cond - uncond)
        tokens = torch.cat(
            [
                unmask_step(
                    logits[i : i + 1],
                    tokens[i : i + 1],
                    step=step,
                    steps=settings.steps,
                    temperature=temperatures[step],
                    schedule=schedule,
                    mask_id=model.cfg.mask_id,
                    generator=noise.generators[i],
                    start_share=1.0 if start_shares is None else start_shares[i],
                )
                for i in range(b)
            ]
        )
    return tokens


@torch.no_grad()
def sample(
    model: MuseTransformer, condition: torch.Tensor, noise: ImageNoise, settings: MuseSamplerSettings
) -> torch.Tensor:
    """AmusedPipeline's decoding from an all-mask grid -> tokens (B, N), each image from its own generator: image i
    gets the tokens AmusedPipeline gives its prompt alone with `generator=torch.Generator().manual_seed(seed_i)`."""
    cfg = model.cfg
    tokens = torch.full((len(noise), cfg.tokens), cfg.mask_id, dtype=torch.long, device=condition.device)
    return unmask_from(model, tokens, condition, noise, settings, first_step=0, schedule=cfg.schedule)


# ------------------------------------------------------------------ editing, as diffusers edits

# AmusedInpaintPipeline sets its scheduler's masking schedule to linear, whatever the model was saved with.
INPAINT_SCHEDULE = "linear"


def repaint_from_mask(masks: np.ndarray | torch.Tensor, grid: int) -> torch.Tensor:
    """Pixel masks (B, H, W), True where to repaint -> the tokens to repaint (B, grid * grid), as
    AmusedInpaintPipeline reads a black-and-white mask image: resized to the token grid by PIL's Lanczos filter, a
    token repainted where the result is at least half white. A token whose patch holds only a few white pixels may
    be kept, and white near a patch's edge may repaint its neighbour (softdimo's own rule repaints every token whose
    patch holds a white pixel)."""
    rows = []
    for mask in np.asarray(masks, dtype=bool):
        white = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))  # a mask image of luminance only
        small = np.asarray(white.resize((grid, grid), resample=Image.Resampling.LANCZOS))
        rows.append(torch.from_numpy(small >= 128).flatten())  # diffusers binarizes value / 255 at 0.5
    return torch.stack(rows)


def first_step(strength: float, steps: int) -> int:
    """The step AmusedImg2ImgPipeline starts at: it runs the last int(steps * strength) of the schedule's steps."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength is in [0, 1], got {strength}")
    return steps - int(steps * strength)


def repaint_at_strength(noise: ImageNoise, strength: float, steps: int, schedule: str, tokens: int) -> torch.Tensor:
    """The tokens AmusedImg2ImgPipeline masks at `strength` (B, tokens), as AmusedScheduler.add_noise masks them: each
    one where a uniform draw falls below the masked share after the step before the first. The draws are the first
    of each image's generator. At strength 1 that step is -1, which the pipeline reads as the last, whose share is 0
    (linear) or cos(pi / 2) (cosine): almost never is a token masked, and the steps, each masking at least one, redraw
    a single token."""
    share = masked_share((first_step(strength, steps) - 1) % steps, steps, schedule, noise.device)
    return noise.rand(tokens) < share


@torch.no_grad()
def inpaint(
    model: MuseTransformer,
    tokens: torch.Tensor,
    repaint: torch.Tensor,
    condition: torch.Tensor,
    noise: ImageNoise,
    settings: MuseSamplerSettings,
) -> torch.Tensor:
    """AmusedInpaintPipeline at its default strength (1): an image's tokens (B, N) with `repaint` (B, N) masked,
    drawn anew in all the steps, on the linear schedule scaled by each image's share of masked tokens -> tokens
    (B, N), the others the image's. Image i gets the tokens the pipeline gives its image, mask and prompt alone with
    `generator=torch.Generator().manual_seed(seed_i)`."""
    masked = torch.where(repaint, model.cfg.mask_id, tokens)
    shares = repaint.sum(dim=1) / repaint.shape[1]  # the pipeline's starting_mask_ratio
    return unmask_from(
        model, masked, condition, noise, settings, first_step=0, schedule=INPAINT_SCHEDULE, start_shares=shares
    )


@torch.no_grad()
def image_to_image(
    model: MuseTransformer,
    tokens: torch.Tensor,
    condition: torch.Tensor,
    noise: ImageNoise,
    settings: MuseSamplerSettings,
    strength: float,
) -> torch.Tensor:
    """AmusedImg2ImgPipeline: an image's tokens (B, N), some masked at random (`repaint_at_strength`), then the last
    int(steps * strength) steps of the model's own schedule -> tokens (B, N). Image i gets the tokens the pipeline
    gives its image and prompt alone with `generator=torch.Generator().manual_seed(seed_i)`."""
    cfg = model.cfg
    repaint = repaint_at_strength(noise, strength, settings.steps, cfg.schedule, tokens.shape[1])
    masked = torch.where(repaint, cfg.mask_id, tokens)
    start = first_step(strength, settings.steps)
    return unmask_from(model, masked, condition, noise, settings, first_step=start, schedule=cfg.schedule)


# ------------------------------------------------------------------ pipelines and bundles


@dataclass
class MuseTeacherPipeline(EditsByFilling):
    """A MUSE model sampled in several steps: CLIP ids and seeds in, images out; and edits, as diffusers makes them.

    Its edits are AmusedInpaintPipeline's (a mask) and AmusedImg2ImgPipeline's (a strength), token for token and
    pixel for pixel, where softdimo's own models edit by softdimo's rules: a mask repaints the tokens diffusers' mask
    processor picks (`repaint_from_mask`); a strength starts the schedule part way, from tokens masked at random by
    that step's share, rather than repainting a share of tokens in all the steps (`image_to_image`); inpainting runs
    on the linear schedule whatever the model's; and the edited tokens are decoded whole, no pixel of the input kept
    as it is."""

    model: MuseTransformer
    tokenizer: MuseTokenizer
    conditioner: TextConditioner
    sampler: MuseSamplerSettings

    @property
    def device(self) -> torch.device:
        return self.model.null_ids.device

    def settings(self, steps: int | None = None) -> MuseSamplerSettings:
        """The sampler's settings, in `steps` steps when given."""
        return self.sampler if steps is None else MuseSamplerSettings(**{**self.sampler.to_dict(), "steps": steps})

    @torch.inference_mode()
    def generate(self, condition: torch.Tensor, seeds: Sequence[int], steps: int | None = None) -> np.ndarray:
        """CLIP ids (B, L) and one seed per image -> uint8 images (B, H, W, 3)."""
        tokens = sample(self.model, condition.to(self.device), ImageNoise(seeds, self.device), self.settings(steps))
        return to_uint8(self.tokenizer.decode_indices(tokens))

    def generate_prompts(
        self, prompts: Sequence[shapes.Prompt], seeds: Sequence[int], steps: int | None = None, batch: int = 50
    ) -> list[np.ndarray]:
        return generate_for_prompts(self, prompts, seeds, steps=steps, batch=batch)

    def repaint_from_mask(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Pixel masks (B, H, W), True where to repaint -> the tokens AmusedInpaintPipeline repaints (B, N)."""
        return repaint_from_mask(masks, self.model.cfg.grid)

    def repaint_at_strength(self, seeds: Sequence[int], strength: float, steps: int | None = None) -> torch.Tensor:
        """The tokens AmusedImg2ImgPipeline masks at `strength` in `steps` (B, N), drawn as with a CPU generator on
        each seed; `edit_at_strength` draws them on the pipeline's device, the same on a CPU."""
        settings = self.settings(steps)
        return repaint_at_strength(
            ImageNoise(seeds), strength, settings.steps, self.model.cfg.schedule, self.model.cfg.tokens
        )

    @torch.inference_mode()
    def fill(self, kept: Kept, condition: torch.Tensor, seeds: Sequence[int], steps: int | None = None) -> torch.Tensor:
        """An edit's tokens (B, N): the kept ones, and the repainted ones drawn as AmusedInpaintPipeline draws them."""
        noise = ImageNoise(seeds, self.device)
        return inpaint(self.model, kept.tokens, kept.repaint, condition.to(self.device), noise, self.settings(steps))

    @torch.inference_mode()
    def edit(
        self,
        images: np.ndarray,
        repaint: torch.Tensor,
        condition: torch.Tensor,
        seeds: Sequence[int],
        steps: int | None = None,
    ) -> np.ndarray:
        """`edit_tokens` decoded whole: AmusedInpaintPipeline's uint8 images (B, H, W, 3)."""
        return to_uint8(self.tokenizer.decode_indices(self.edit_tokens(images, repaint, condition, seeds, steps)))

    @torch.inference_mode()
    def edit_tokens_at_strength(
        self,
        images: np.ndarray,
        strength: float,
        condition: torch.Tensor,
        seeds: Sequence[int],
        steps: int | None = None,
    ) -> torch.Tensor:
        """uint8 images (B, H, W, 3) at the model's size, a strength in [0, 1], CLIP ids and one seed per image ->
        the tokens (B, N) AmusedImg2ImgPipeline gives."""
        tokens = image_tokens(self.tokenizer, images, self.device)
        noise = ImageNoise(seeds, self.device)
        return image_to_image(self.model, tokens, condition.to(self.device), noise, self.settings(steps), strength)

    @torch.inference_mode()
    def edit_at_strength(
        self,
        images: np.ndarray,
        strength: float,
        condition: torch.Tensor,
        seeds: Sequence[int],
        steps: int | None = None,
    ) -> np.ndarray:
        """`edit_tokens_at_strength` decoded: AmusedImg2ImgPipeline's uint8 images (B, H, W, 3)."""
        tokens = self.edit_tokens_at_strength(images, strength, condition, seeds, steps)
        return to_uint8(self.tokenizer.decode_indices(tokens))


def load_parts(
    folder: Path, micro: MicroConditioning, device: torch.device | str = "cpu"
) -> tuple[MuseTransformer, MuseTokenizer, TextConditioner]:
    """The transformer, tokenizer and conditioner of a diffusers MUSE folder, from local files only, frozen."""
    require_diffusers()
    from diffusers import AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    def component(cls, name: str):
        if not (folder / name).is_dir():
            raise BundleError(
                f"{folder}: no {name}/ folder; "
                "a MUSE bundle holds vqvae/, transformer/, text_encoder/, tokenizer/, scheduler/"
            )
        return cls.from_pretrained(folder / name, local_files_only=True)

    uvit, vqvae = component(UVit2DModel, "transformer"), component(VQModel, "vqvae")
    text_encoder, clip_tokenizer = (
        component(CLIPTextModelWithProjection, "text_encoder"),
        component(CLIPTokenizer, "tokenizer"),
    )
    scheduler = component(AmusedScheduler, "scheduler")
    scale = 2 ** (len(vqvae.config.block_out_channels) - 1)  # pixels per token side, as AmusedPipeline computes it
    grid = uvit.config.sample_size
    length = clip_tokenizer.model_max_length
    cfg = MuseConfig(
        codebook_size=uvit.config.codebook_size,
        mask_id=scheduler.config.mask_token_id,
        grid=grid,
        width=uvit.config.block_out_channels,
        state_width=uvit.config.hidden_size,
        depth=uvit.config.num_hidden_layers,
        text_length=length,
        image_size=grid * scale,
        schedule=scheduler.config.masking_schedule,
        micro=micro,
    )
    null_ids = clip_tokenizer(
        [""], padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    ).input_ids
    model = MuseTransformer(uvit=uvit, text_encoder=text_encoder, null_ids=null_ids, cfg=cfg)
    tokenizer = MuseTokenizer(
        vqvae, MuseImageConfig(image_size=cfg.image_size, grid=grid, codebook_size=cfg.codebook_size)
    )
    freeze = lambda m: m.to(device).eval().requires_grad_(False)  # noqa: E731
    return freeze(model), freeze(tokenizer), TextConditioner(clip_tokenizer, length)


def write_teacher_bundle(
    folder: str | Path,
    *,
    name: str,
    sampler: MuseSamplerSettings = MuseSamplerSettings(),
    micro: MicroConditioning = MicroConditioning(),
    source: str | Path | None = None,
) -> Path:
    """Make a teacher bundle of a diffusers MUSE folder: in place, or a copy of `source` when given."""
    folder = Path(folder)
    if source is not None and Path(source).resolve() != folder.resolve():
        top = Path(source).resolve()
        skip = lambda where, names: [
            n for n in names if n.startswith(".") or (Path(where).resolve() == top and n in (CONFIG, MANIFEST))
        ]  # noqa: E731
        shutil.copytree(source, folder, dirs_exist_ok=True, ignore=skip)
    for part in ("vqvae", "transformer", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / part).is_dir():
            raise BundleError(f"{folder}: no {part}/ folder; give the folder diffusers' save_pretrained wrote")
    config = {
        "name": name,
        "kind": "masked-diffusion",
        "architecture": ARCHITECTURE,
        "conditioning": "text",
        "sampler": sampler.to_dict(),
        "micro_conditioning": micro.to_dict(),
    }
    return seal_folder(folder, config)


def export_generator(
    *,
    generator,
    teacher: Bundle,
    path: str | Path,
    name: str,
    reward_references: list[str],
    tteo: dict,
    training: dict,
    teacher_reference: str,
) -> Path:
    """Write a distilled MUSE student: the teacher's folder with the student's UVit2DModel as `transformer/`, so
    that diffusers loads it as it loads the teacher, plus softdimo's one-step config."""
    out = Path(path)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for part in COPIED:
        source = teacher.path / part
        if source.is_dir():
            shutil.copytree(source, out / part)
        elif source.is_file():
            shutil.copy2(source, out / part)
    generator.model.uvit.save_pretrained(out / "transformer")
    config = {
        "name": name,
        "kind": "one-step",
        "architecture": ARCHITECTURE,
        "conditioning": "text",
        "generator": generator.settings.to_dict(),
        "micro_conditioning": generator.model.cfg.micro.to_dict(),
        "rewards": reward_references,
        "tteo": tteo,
        "teacher": teacher_reference,
        "training": training,
    }
    return seal_folder(out, config)
