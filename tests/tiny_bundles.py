"""Tiny random-weight bundles written to disk, for tests of everything that loads bundles."""

from __future__ import annotations

import os
from pathlib import Path

from dataclasses import replace

import numpy as np
import torch

from softdimo import shapes
from softdimo.conditioning import Conditioner
from softdimo.generator import GeneratorSettings, OneStepGenerator
from softdimo.pipeline import save_one_step, save_reward, save_teacher, save_tokenizer
from softdimo.sampler import SamplerSettings
from softdimo.transformer import MaskedTransformer, TransformerConfig
from softdimo.tteo import TTEOSettings
from softdimo.vq import TokenizerConfig, VQTokenizer, to_tensor

TINY_TOKENIZER = TokenizerConfig(
    encoder="dictionary", dictionary_size=64, dictionary_dim=4, stem=8, channels=(16,), blocks=1
)
TINY_FSQ_TOKENIZER = TokenizerConfig(levels=(4, 4, 4), channels=(16, 32), blocks=1, encoder="patch")


def tiny_tokenizer(seed: int = 0) -> VQTokenizer:
    """A tiny dictionary tokenizer: prototypes fitted to 64 Shapes images (64 k-means codes), a random decoder."""
    from softdimo.train.tokenizer import fit_dictionary, image_patches

    images = to_tensor(shapes.batch(np.random.default_rng(seed), 64)[0])
    prototypes = fit_dictionary(image_patches(TINY_TOKENIZER, images), TINY_TOKENIZER.dictionary_size, seed=seed)
    torch.manual_seed(seed)
    tokenizer = VQTokenizer(replace(TINY_TOKENIZER, dictionary_size=len(prototypes)))
    tokenizer.encoder.prototypes.copy_(prototypes)
    return tokenizer


def tiny_transformer_config(conditioner: Conditioner, codebook_size: int = 64) -> TransformerConfig:
    return TransformerConfig(
        codebook_size=codebook_size,
        tokens=64,
        width=32,
        depth=2,
        heads=4,
        code_dim=TINY_TOKENIZER.code_dim,
        **conditioner.model_sizes(),
    )


def tiny_transformer(conditioner: Conditioner) -> MaskedTransformer:
    """A tiny random transformer that knows the tiny tokenizer's code vectors, as a trained teacher would."""
    model = MaskedTransformer(tiny_transformer_config(conditioner))
    model.set_code_vectors(tiny_tokenizer().codebook.detach())
    return model


def write_tokenizer(folder: Path, seed: int = 0) -> Path:
    return save_tokenizer(tiny_tokenizer(seed), folder, name="tiny-tokenizer", dtype=None)


def write_teacher(
    folder: Path, tokenizer: Path, conditioner: Conditioner, name: str, steps: int = 4, seed: int = 0
) -> Path:
    torch.manual_seed(seed)
    return save_teacher(
        tiny_transformer(conditioner),
        folder,
        name=name,
        conditioner=conditioner,
        sampler=SamplerSettings(steps=steps),
        tokenizer_reference=os.path.relpath(tokenizer, folder),
        dtype=None,
    )


def write_reward(folder: Path, seed: int = 0) -> Path:
    from softdimo import shapes
    from softdimo.reward import AlignmentConfig, AlignmentModel
    from softdimo.text import PromptTokenizer

    torch.manual_seed(seed)
    model = AlignmentModel(
        AlignmentConfig(width=16, channels=(8, 8), text_layers=1, text_heads=2, grounding=True),
        PromptTokenizer(shapes.VOCABULARY, 12),
    )
    return save_reward(model, folder, name="tiny-clip", dtype=None)


def write_one_step(
    folder: Path, tokenizer: Path, reward: Path, conditioner: Conditioner, name: str, seed: int = 0
) -> Path:
    torch.manual_seed(seed)
    return save_one_step(
        OneStepGenerator(tiny_transformer(conditioner), GeneratorSettings()),
        folder,
        name=name,
        conditioner=conditioner,
        tokenizer_reference=os.path.relpath(tokenizer, folder),
        reward_references=[os.path.relpath(reward, folder)],
        tteo=TTEOSettings(steps=3, lr=1.0),
        dtype=None,
    )


def tiny_latent_generator(transformer: MaskedTransformer) -> OneStepGenerator:
    """A one-step generator of `transformer` with a 2-number layout latent that decides its image, and a layout
    prior of 8 components spread apart; deterministic given the latent, as the shipped text model is."""
    from softdimo.layout_prior import LayoutPrior, LayoutPriorConfig, small_body
    from softdimo.train.latent import latent_student

    torch.manual_seed(0)
    body = small_body(transformer.cfg, width=16, depth=1, heads=2, tokens=1)
    prior = LayoutPrior(LayoutPriorConfig(body=body, latent_dim=2, components=8)).eval()
    prior.place(3 * torch.randn(8, 2), torch.full((8, 2), -1.0))
    student = latent_student(transformer, 2)
    with torch.no_grad():
        student.latent_input.weight.mul_(50)  # a latent decides the image
    return OneStepGenerator(student, GeneratorSettings(r_init=1.0, sigma=0.0, temperature=0.0), prior)


def write_checked_one_step(folder: Path, tokenizer: Path, reward: Path, name: str, bar: float, seed: int = 0) -> Path:
    """`tiny_latent_generator` as a text bundle, with a draw check on the tiny reward at `bar`."""
    from softdimo.draw_check import DrawCheck

    torch.manual_seed(seed)
    conditioner = Conditioner.shapes_text()
    return save_one_step(
        tiny_latent_generator(tiny_transformer(conditioner)),
        folder,
        name=name,
        conditioner=conditioner,
        tokenizer_reference=os.path.relpath(tokenizer, folder),
        reward_references=[os.path.relpath(reward, folder)],
        tteo=TTEOSettings(steps=3, lr=1.0),
        check=DrawCheck(reward="tiny-clip", bar=bar),
        dtype=None,
    )


def write_all(root: Path) -> dict[str, Path]:
    """A tokenizer, a reward, one-step text and class models and their teachers under `root`."""
    tokenizer = write_tokenizer(root / "tokenizer")
    reward = write_reward(root / "reward")
    return {
        "tokenizer": tokenizer,
        "reward": reward,
        "text": write_teacher(root / "teacher-text", tokenizer, Conditioner.shapes_text(), "tiny-text"),
        "class": write_teacher(root / "teacher-class", tokenizer, Conditioner.shapes_class(), "tiny-class"),
        "one-step": write_one_step(
            root / "one-step-text", tokenizer, reward, Conditioner.shapes_text(), "tiny-one-step"
        ),
        "one-step-class": write_one_step(
            root / "one-step-class", tokenizer, reward, Conditioner.shapes_class(), "tiny-one-step-class"
        ),
    }
