"""Hard negatives are one edit away and still prompts of the grammar; the shipped reward is differentiable and frozen.

How well the shipped reward ranks true prompts above hard negatives is measured by `softdimo eval weights/shapes-clip`."""

from pathlib import Path

import numpy as np
import pytest
import torch

from softdimo import shapes
from softdimo.bundle import read_bundle
from softdimo.pipeline import load_reward
from softdimo.train.reward import hard_negative
from softdimo.vq import to_tensor

SHIPPED = Path(__file__).resolve().parents[2] / "weights" / "shapes-clip"


@pytest.fixture(scope="module")
def reward():
    return load_reward(read_bundle(SHIPPED))


def _held_out(count: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [shapes.sample_prompt(rng) for _ in range(count)]
    images = to_tensor(np.stack([shapes.render(shapes.sample_scene(p, rng)) for p in prompts]))
    return prompts, images


def test_hard_negatives_differ_by_one_edit():
    rng = np.random.default_rng(0)
    for _ in range(200):
        prompt = shapes.sample_prompt(rng)
        negative = hard_negative(prompt, rng)
        assert negative != prompt and negative.kind == prompt.kind
        assert shapes.parse_prompt(negative.text()) == negative  # still a prompt of the grammar


def test_reward_is_differentiable_in_pixels(reward):
    prompts, images = _held_out(4, seed=5)
    images = images.clone().requires_grad_(True)
    reward.score(images, [p.text() for p in prompts]).sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())  # the reward itself stays frozen
