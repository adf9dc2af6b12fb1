"""Pipelines compose loaded parts: conditioning -> transformer sampling -> tokenizer decoding -> images."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from softdimo import editing, shapes
from softdimo.bundle import Bundle, BundleError, read_bundle, save_bundle
from softdimo.conditioning import Conditioner
from softdimo.draw_check import CheckedDraw, Cleared, DrawCheck, checked_draw, first_clearing
from softdimo.generator import GeneratorSettings, OneStepGenerator
from softdimo.layout_prior import LayoutPrior, LayoutPriorConfig
from softdimo.prompt_images import generate_for_prompts
from softdimo.reward import AlignmentConfig, AlignmentModel, AlignmentReward, Reward
from softdimo.seeding import ImageNoise, derived_seed
from softdimo.text import PromptTokenizer
from softdimo.tteo import Chunks, Refined, StepHook, TTEOSettings, refine
from softdimo.sampler import SamplerSettings, sample
from softdimo.transformer import MaskedTransformer, TransformerConfig
from softdimo.vq import TokenizerConfig, VQTokenizer, to_uint8


# Served images are decoded in chunks of this many, so that a seed gives the same pixels in any batch.
DECODE_CHUNK = {"cpu": 4, "cuda": 32}


def load_tokenizer(bundle: Bundle, device: torch.device | str = "cpu") -> VQTokenizer:
    if bundle.config.get("kind") != "tokenizer":
        raise BundleError(f"{bundle.path}: not a tokenizer bundle")
    tokenizer = VQTokenizer(TokenizerConfig.from_dict(bundle.config["tokenizer"]))
    tokenizer.load_state_dict(bundle.weights("tokenizer"), strict=True)
    tokenizer.decode_chunk = DECODE_CHUNK.get(torch.device(device).type, 4)
    return tokenizer.to(device).eval().requires_grad_(False)


def load_transformer(
    bundle: Bundle, stem: str = "transformer", device: torch.device | str = "cpu"
) -> MaskedTransformer:
    model = MaskedTransformer(TransformerConfig.from_dict(bundle.config["transformer"]))
    model.load_state_dict(bundle.weights(stem), strict=True)
    return model.to(device).eval().requires_grad_(False)


class ScoredByRewards:
    """What a pipeline with `rewards` (by name), a `conditioner` and perhaps a draw `check` shares: its default
    reward, the check's reward named among its own, and what the check scores a batch's images with."""

    def _check_reward_is_known(self) -> None:
        if self.check is not None and self.check.reward not in self.rewards:
            raise ValueError(f"the draw check's reward {self.check.reward!r} is not among the model's rewards")

    @property
    def default_reward(self) -> str | None:
        return next(iter(self.rewards), None)

    def _check_scoring(self, condition: torch.Tensor) -> tuple[Reward, list[str]]:
        """The check's reward and the texts it reads for a batch's conditioning (B, ...)."""
        return self.rewards[self.check.reward], self.conditioner.reward_texts(condition)


@dataclass
class TeacherPipeline(editing.EditsByFilling, ScoredByRewards):
    """A multi-step masked-diffusion model with its tokenizer: conditioning and seeds in, images out. Under a draw
    check, an image its reward scores below the bar is sampled again from the next of its seed's derived seeds
    (softdimo/draw_check.py)."""

    model: MaskedTransformer
    tokenizer: VQTokenizer
    conditioner: Conditioner
    sampler: SamplerSettings
    rewards: dict[str, Reward] = field(default_factory=dict)
    check: DrawCheck | None = None

    def __post_init__(self):
        self._check_reward_is_known()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def generate(self, condition: torch.Tensor, seeds: Sequence[int], steps: int | None = None) -> np.ndarray:
        """Conditioning (B, ...) and one seed per image -> uint8 images (B, H, W, 3)."""
        settings, condition, contrasts = self._sampling(condition, steps)
        if self.check is None:
            tokens = sample(self.model, condition, ImageNoise(seeds, self.device), settings, contrasts)
            return to_uint8(self.tokenizer.decode_indices(tokens))

        def draw(proposal: int, rows: torch.Tensor) -> torch.Tensor:
            noise = self._proposed_noise(seeds, rows, proposal)
            return sample(self.model, condition[rows], noise, settings, _contrast_rows(contrasts, rows))

        return to_uint8(self._checked(draw, condition).images)

    def generate_prompts(
        self,
        prompts: Sequence[shapes.Prompt],
        seeds: Sequence[int],
        steps: int | None = None,
        batch: int = 50,
        runtime=None,
    ) -> list[np.ndarray]:
        return generate_for_prompts(self, prompts, seeds, steps=steps, batch=batch, runtime=runtime)

    @torch.inference_mode()
    def fill(
        self,
        kept: editing.Kept,
        condition: torch.Tensor,
        seeds: Sequence[int],
        steps: int | None = None,
    ) -> torch.Tensor:
        """An edit's tokens (B, N): the kept ones, and the repainted ones drawn in the teacher's steps."""
        settings, condition, contrasts = self._sampling(condition, steps)
        if self.check is None:
            noise = ImageNoise(seeds, self.device)
            return editing.fill_teacher(self.model, kept, condition, noise, settings, contrasts)

        def draw(proposal: int, rows: torch.Tensor) -> torch.Tensor:
            noise = self._proposed_noise(seeds, rows, proposal)
            contrast_rows = _contrast_rows(contrasts, rows)
            return editing.fill_teacher(self.model, kept.rows(rows), condition[rows], noise, settings, contrast_rows)

        return self._checked(draw, condition, kept).tokens

    def _sampling(self, condition: torch.Tensor, steps: int | None):
        """The sampler settings for `steps` (None: the model's), the conditioning on the device and its contrasts."""
        settings = self.sampler if steps is None else SamplerSettings(**{**self.sampler.to_dict(), "steps": steps})
        condition = condition.to(self.device)
        return settings, condition, self.conditioner.contrasts(condition) if settings.contrast else None

    def _proposed_noise(self, seeds: Sequence[int], rows: torch.Tensor, proposal: int) -> ImageNoise:
        """The noise of proposal number `proposal` of the images at `rows`: their own seeds' for the first, their
        seeds' derived seeds' (softdimo.seeding.derived_seed) for the others."""
        own = [seeds[i] for i in rows.tolist()]
        return ImageNoise(own if proposal == 0 else [derived_seed(s, proposal) for s in own], self.device)

    def _checked(self, draw, condition: torch.Tensor, kept: editing.Kept | None = None) -> Cleared:
        reward, texts = self._check_scoring(condition)
        return first_clearing(draw, self.tokenizer, reward, self.check, texts, self.device, kept)


def _contrast_rows(contrasts: tuple[torch.Tensor, torch.Tensor] | None, rows: torch.Tensor):
    return None if contrasts is None else (contrasts[0][rows], contrasts[1][rows])


@dataclass
class OneStepPipeline(editing.EditsByFilling, ScoredByRewards):
    """A one-step generator with its tokenizer and rewards: one forward pass per image (more where a draw check
    redraws it), or TTEO."""

    generator: OneStepGenerator
    tokenizer: VQTokenizer
    conditioner: Conditioner
    rewards: dict[str, Reward]
    tteo: TTEOSettings
    check: DrawCheck | None = None  # images scoring below a bar drawn again (softdimo/draw_check.py)

    def __post_init__(self):
        if self.check is not None and self.generator.prior is None:
            raise ValueError("a draw check chooses among a layout prior's proposals: this generator has none")
        self._check_reward_is_known()

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @torch.inference_mode()
    def generate(self, condition: torch.Tensor, seeds: Sequence[int], steps: int | None = None) -> np.ndarray:
        """Conditioning (B, ...) and one seed per image -> uint8 images (B, H, W, 3), in one forward pass (and, with a
        draw check, one more for each image it draws again)."""
        if steps is not None:
            raise ValueError("a one-step generator takes no sampling steps")
        noise = ImageNoise(seeds, self.device)
        if self.check is not None:
            return to_uint8(self.checked_draw(condition, noise).images)
        tokens = self.generator.generate_tokens(condition.to(self.device), noise)
        return to_uint8(self.tokenizer.decode_indices(tokens))

    def checked_draw(
        self,
        condition: torch.Tensor,
        noise: ImageNoise,
        kept: editing.Kept | None = None,
        *,
        between_rounds: Callable[[], object] | None = None,
    ) -> CheckedDraw:
        """The images of the conditioning (B, ...), or edits of `kept`'s, each drawn under the pipeline's draw check
        (`between_rounds` run between its rounds of redraws)."""
        reward, texts = self._check_scoring(condition)
        return checked_draw(
            self.generator,
            self.tokenizer,
            reward,
            self.check,
            condition,
            texts,
            noise,
            kept,
            between_rounds=between_rounds,
        )

    def generate_prompts(
        self,
        prompts: Sequence[shapes.Prompt],
        seeds: Sequence[int],
        steps: int | None = None,
        batch: int = 50,
        runtime=None,
    ) -> list[np.ndarray]:
        return generate_for_prompts(self, prompts, seeds, steps=steps, batch=batch, runtime=runtime)

    @torch.inference_mode()
    def fill(
        self,
        kept: editing.Kept,
        condition: torch.Tensor,
        seeds: Sequence[int],
        steps: int | None = None,
    ) -> torch.Tensor:
        """An edit's tokens (B, N): the kept ones, and the repainted ones drawn in one forward pass."""
        if steps is not None:
            raise ValueError("a one-step generator takes no sampling steps")
        noise = ImageNoise(seeds, self.device)
        if self.check is not None:
            return self.checked_draw(condition, noise, kept).tokens
        return editing.fill_one_step(self.generator, kept, condition, noise)

    def refine(
        self,
        condition: torch.Tensor,
        texts: Sequence[str],
        candidates: Sequence[Sequence[int]],
        settings: TTEOSettings,
        reward: str | None = None,
        on_step: StepHook | None = None,
        kept: editing.Kept | None = None,
        *,
        chunks: Chunks | None = None,
    ) -> Refined:
        """TTEO for a batch; `texts` are what the reward reads (prompts, or class names as prompts). Each candidate
        starts from the image `generate` draws for its seed (with `kept`, the edit `edit` draws), under the draw
        check where the model has one; with `chunks`, in pieces of images with pauses between (the draw check's
        too)."""
        return refine(
            generator=self.generator,
            tokenizer=self.tokenizer,
            reward=self.rewards[reward or self.default_reward],
            condition=condition,
            prompts=texts,
            candidates=candidates,
            settings=settings,
            on_step=on_step,
            kept=kept,
            start=None if self.check is None else self._checked_start,
            chunks=chunks,
        )

    def _checked_start(
        self, noise: ImageNoise, condition: torch.Tensor, kept: editing.Kept | None, pause: Callable[[], object]
    ):
        draw = self.checked_draw(condition, noise, kept, between_rounds=pause)
        return draw.embeddings, draw.latent, draw.gumbel

    def refine_edit(
        self,
        images: np.ndarray,
        repaint: torch.Tensor,
        condition: torch.Tensor,
        texts: Sequence[str],
        candidates: Sequence[Sequence[int]],
        settings: TTEOSettings,
        reward: str | None = None,
        on_step: StepHook | None = None,
        *,
        chunks: Chunks | None = None,
    ) -> Refined:
        """TTEO on edits (as `edit` takes them): each starts from the edit its candidate seed draws, and its kept
        tokens and pixels stay the input's."""
        with torch.no_grad():
            kept = editing.Kept.of(self.tokenizer, images, repaint, self.device)
        return self.refine(condition, texts, candidates, settings, reward, on_step, kept, chunks=chunks)


def load_reward(bundle: Bundle, device: torch.device | str = "cpu") -> Reward:
    if bundle.config.get("kind") != "reward":
        raise BundleError(f"{bundle.path}: not a reward bundle")
    if bundle.config.get("architecture") == "transformers-clip":
        from softdimo.clip_reward import load_clip_reward

        return load_clip_reward(bundle, device)
    tokenizer = PromptTokenizer(tuple(bundle.config["vocabulary"]), bundle.config["length"])
    model = AlignmentModel(AlignmentConfig.from_dict(bundle.config["alignment"]), tokenizer)
    model.load_state_dict(bundle.weights("reward"), strict=True)
    return AlignmentReward(model.to(device), name=bundle.config["name"])


def load_pipeline(
    path: str | os.PathLike | Bundle, device: torch.device | str = "cpu"
) -> TeacherPipeline | OneStepPipeline:
    """Open a model bundle (verifying checksums), or take one already open, and build its pipeline on `device`."""
    bundle = path if isinstance(path, Bundle) else read_bundle(path)
    if bundle.config.get("architecture") == "diffusers-muse":
        return _load_muse_pipeline(bundle, device)
    kind = bundle.config.get("kind")
    tokenizer = load_tokenizer(bundle.resolve(bundle.config["tokenizer"]), device)
    conditioner = Conditioner.from_dict(bundle.config["conditioner"])
    rewards = [load_reward(bundle.resolve(ref), device) for ref in bundle.config.get("rewards", [])]
    check = DrawCheck(**bundle.config["check"]) if "check" in bundle.config else None
    if kind == "masked-diffusion":
        if check is not None and "prior_temperature" in bundle.config["check"]:
            raise BundleError(f"{bundle.path}: a teacher's draw check has no layout prior to flatten")
        return TeacherPipeline(
            model=load_transformer(bundle, device=device),
            tokenizer=tokenizer,
            conditioner=conditioner,
            sampler=SamplerSettings(**bundle.config["sampler"]),
            rewards={r.name: r for r in rewards},
            check=check,
        )
    if kind == "one-step":
        generator = OneStepGenerator(
            load_transformer(bundle, device=device),
            GeneratorSettings(**bundle.config["generator"]),
            load_layout_prior(bundle, device),
        )
        return OneStepPipeline(
            generator=generator,
            tokenizer=tokenizer,
            conditioner=conditioner,
            rewards={r.name: r for r in rewards},
            tteo=TTEOSettings(**bundle.config.get("tteo", {})),
            check=check,
        )
    raise BundleError(f"{bundle.path}: unknown model kind {kind!r}")


def _load_muse_pipeline(bundle: Bundle, device: torch.device | str = "cpu"):
    """A diffusers MUSE bundle's pipeline (softdimo.muse's parts): the teacher (kind masked-diffusion) or a one-step
    student around its transformer (kind one-step)."""
    from softdimo import muse

    config = bundle.config
    micro = muse.MicroConditioning.from_dict(config.get("micro_conditioning", {}))
    model, tokenizer, conditioner = muse.load_parts(bundle.path, micro, device)
    tokenizer.decode_chunk = DECODE_CHUNK.get(torch.device(device).type, 4)
    if config["kind"] == "masked-diffusion":
        sampler = muse.MuseSamplerSettings.from_dict(config.get("sampler", {}))
        return muse.MuseTeacherPipeline(model, tokenizer, conditioner, sampler)
    if config["kind"] == "one-step":
        rewards = [load_reward(bundle.resolve(ref), device) for ref in config.get("rewards", [])]
        return OneStepPipeline(
            generator=OneStepGenerator(model, GeneratorSettings(**config["generator"])),
            tokenizer=tokenizer,
            conditioner=conditioner,
            rewards={r.name: r for r in rewards},
            tteo=TTEOSettings(**config.get("tteo", {})),
        )
    raise BundleError(f"{bundle.path}: unknown model kind {config['kind']!r}")


def load_layout_prior(bundle: Bundle, device: torch.device | str = "cpu") -> LayoutPrior | None:
    """A one-step bundle's layout prior, None where it has none (its latent is drawn from the standard normal)."""
    if "prior" not in bundle.config:
        return None
    prior = LayoutPrior(LayoutPriorConfig.from_dict(bundle.config["prior"]))
    prior.load_state_dict(bundle.weights("prior"), strict=True)
    return prior.to(device).eval()


def load_features(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The feature network of a `features` bundle, for Fréchet distances."""
    from softdimo.features import FeatureNet, FeatureNetConfig

    bundle = read_bundle(path)
    if bundle.config.get("kind") != "features":
        raise BundleError(f"{bundle.path}: not a features bundle")
    net = FeatureNet(FeatureNetConfig.from_dict(bundle.config["features"]))
    net.load_state_dict(bundle.weights("features"), strict=True)
    return net.to(device).eval()


# ---------------------------------------------------------------- writing: each kind's config.json, beside its loader
# `training` is the training settings a bundle records (asdict of the stage's dataclass); references are paths to
# other bundles relative to this one. Weights are stored in fp16 unless `dtype` says otherwise (None: as they are).


def _save(path, config: dict, training: dict | None, weights: dict, dtype: torch.dtype | None) -> Path:
    return save_bundle(path, config | ({"training": training} if training is not None else {}), weights, dtype=dtype)


def save_tokenizer(
    tokenizer: VQTokenizer, path, *, name: str, training: dict | None = None, dtype=torch.float16
) -> Path:
    config = {"name": name, "kind": "tokenizer", "tokenizer": tokenizer.cfg.to_dict()}
    return _save(path, config, training, {"tokenizer": tokenizer.state_dict()}, dtype)


def save_features(net, path, *, name: str, training: dict | None = None, dtype=torch.float16) -> Path:
    config = {"name": name, "kind": "features", "features": net.cfg.to_dict()}
    return _save(path, config, training, {"features": net.state_dict()}, dtype)


def save_reward(model: AlignmentModel, path, *, name: str, training: dict | None = None, dtype=torch.float16) -> Path:
    config = {
        "name": name,
        "kind": "reward",
        "alignment": model.cfg.to_dict(),
        "vocabulary": list(model.prompt_tokenizer.vocabulary),
        "length": model.prompt_tokenizer.length,
    }
    return _save(path, config, training, {"reward": model.state_dict()}, dtype)


def save_teacher(
    model: MaskedTransformer,
    path,
    *,
    name: str,
    conditioner: Conditioner,
    sampler: SamplerSettings,
    tokenizer_reference: str,
    reward_references: Sequence[str] = (),
    check: DrawCheck | None = None,
    training: dict | None = None,
    dtype=torch.float16,
) -> Path:
    """`check`: the draw check the teacher's images are sampled under, by one of its rewards (softdimo/draw_check.py);
    a teacher has no layout prior, so the check's `prior_temperature` is not written."""
    config = {
        "name": name,
        "kind": "masked-diffusion",
        "conditioning": model.cfg.conditioning,
        "transformer": model.cfg.to_dict(),
        "conditioner": conditioner.to_dict(),
        "sampler": sampler.to_dict(),
        "tokenizer": tokenizer_reference,
    }
    if reward_references:
        config["rewards"] = list(reward_references)
    if check is not None:
        config["check"] = {k: v for k, v in check.to_dict().items() if k != "prior_temperature"}
    return _save(path, config, training, {"transformer": model.state_dict()}, dtype)


def save_one_step(
    generator: OneStepGenerator,
    path,
    *,
    name: str,
    conditioner: Conditioner,
    tokenizer_reference: str,
    reward_references: Sequence[str],
    tteo: TTEOSettings,
    teacher_reference: str | None = None,
    training: dict | None = None,
    encoder=None,
    check: DrawCheck | None = None,
    dtype=torch.float16,
) -> Path:
    """`encoder`: a latent stage's layout encoder (softdimo.train.latent), kept for fitting a layout prior to it;
    `check`: the draw check the model's images are drawn under (softdimo/draw_check.py)."""
    config = {
        "name": name,
        "kind": "one-step",
        "conditioning": generator.cfg.conditioning,
        "transformer": generator.cfg.to_dict(),
        "generator": generator.settings.to_dict(),
        "conditioner": conditioner.to_dict(),
        "tokenizer": tokenizer_reference,
        "rewards": list(reward_references),
        "tteo": tteo.to_dict(),
    }
    if teacher_reference is not None:
        config["teacher"] = teacher_reference
    if check is not None:
        config["check"] = check.to_dict()
    weights = {"transformer": generator.model.state_dict()}
    if generator.prior is not None:
        config["prior"] = generator.prior.cfg.to_dict()
        weights["prior"] = generator.prior.state_dict()
    if encoder is not None:
        config["encoder"] = encoder.config()
        weights["encoder"] = encoder.state_dict()
    return _save(path, config, training, weights, dtype)
