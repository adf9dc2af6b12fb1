"""Hard negatives are one edit away: prompts still of the grammar, images the judge fails; the shipped reward is
differentiable and frozen.

How well the shipped reward ranks true prompts and images above hard negatives is measured by `softdimo eval
weights/shapes-clip`."""

from pathlib import Path

import numpy as np
import pytest

from softdimo import shapes
from softdimo.bundle import read_bundle
from softdimo.judge import judge
from softdimo.pipeline import load_reward
from softdimo.train.reward import hard_negative, negative_scene
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


@pytest.mark.parametrize("placement", shapes.PLACEMENTS)
def test_hard_negative_images_fail_their_prompt_by_one_edit(placement):
    rng = np.random.default_rng(1)
    sizes = set()
    for _ in range(300):
        prompt = shapes.sample_prompt(rng)
        scene = shapes.sample_scene(prompt, rng, placement)
        negative = negative_scene(scene, rng, placement)
        assert not judge(shapes.render(negative), prompt).passed  # the judge sees the edit
        assert abs(len(negative) - len(scene)) <= 1 and len([o for o in negative if o not in scene]) <= 1
        corners = {side: set(shapes.corner_positions(side, placement)) for side in shapes.SIZES.values()}
        assert all(o.x0 in corners[o.size] and o.y0 in corners[o.size] for o in negative)  # still the world's placement
        sizes.add(len(negative) - len(scene))
    assert sizes == {-1, 0, 1}  # objects too few, merged (as many), too many


def test_reward_is_differentiable_in_pixels(reward):
    prompts, images = _held_out(4, seed=5)
    images = images.clone().requires_grad_(True)
    reward.score(images, [p.text() for p in prompts]).sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())  # the reward itself stays frozen
