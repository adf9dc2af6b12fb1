"""Editing: the tokens a mask or a strength repaints; kept tokens and far pixels are the input's; the rest filled in."""

import numpy as np
import pytest
import torch

from softdimo import editing, shapes, tteo
from softdimo.pipeline import load_pipeline
from softdimo.vq import to_uint8

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red circle"]
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return shapes.batch(np.random.default_rng(3), len(PROMPTS))[0]


@pytest.fixture(scope="module", params=["one-step", "text"])
def pipeline(request, tiny_bundles):
    """The tiny one-step text model and the tiny text teacher."""
    torch.set_num_threads(1)
    return load_pipeline(tiny_bundles[request.param])


def right_half_masks(count: int) -> np.ndarray:
    masks = np.zeros((count, 64, 64), dtype=bool)
    masks[:, 10:40, 33:60] = True
    return masks


def test_a_mask_repaints_every_token_whose_patch_it_touches():
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, 9, 17] = True  # one pixel of the patch at row 1, column 2
    masks[1, 10:40, 33:60] = True  # rows 1..4, columns 4..7
    repaint = editing.repaint_from_mask(masks, grid=8)
    assert repaint.shape == (2, 64)
    assert torch.nonzero(repaint[0]).flatten().tolist() == [1 * 8 + 2]
    assert torch.nonzero(repaint[1]).flatten().tolist() == [row * 8 + col for row in range(1, 5) for col in range(4, 8)]


@pytest.mark.parametrize("strength,count", [(0.0, 0), (0.3, 19), (0.5, 32), (0.75, 48), (1.0, 64)])
def test_a_strength_repaints_its_rounded_share_of_tokens(strength, count):
    repaint = editing.repaint_at_strength([0, 1, 2], strength, tokens=64)
    assert repaint.sum(-1).tolist() == [count] * 3


def test_each_seed_chooses_its_own_tokens_and_always_the_same():
    first = editing.repaint_at_strength([10, 11], 0.5, tokens=64)
    again = editing.repaint_at_strength([11], 0.5, tokens=64)
    assert not torch.equal(first[0], first[1])
    assert torch.equal(first[1], again[0])


def test_strength_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        editing.repaint_at_strength([0], 1.5, tokens=64)


def test_kept_tokens_are_the_inputs_and_repainted_ones_are_filled(pipeline, images):
    repaint = editing.repaint_from_mask(right_half_masks(3), grid=8)
    condition = pipeline.conditioner.encode_prompts(PROMPTS)
    source = editing.image_tokens(pipeline.tokenizer, images, pipeline.device)
    edited = pipeline.edit_tokens(images, repaint, condition, SEEDS)
    assert torch.equal(edited[~repaint], source[~repaint])
    assert (edited < pipeline.tokenizer.cfg.codebook_size).all()  # no mask id left
    assert not torch.equal(edited[repaint], source[repaint])  # the model drew new tokens there


def test_image_to_image_keeps_every_unchosen_token(pipeline, images):
    repaint = editing.repaint_at_strength(SEEDS, 0.5, tokens=64)
    condition = pipeline.conditioner.encode_prompts(PROMPTS)
    source = editing.image_tokens(pipeline.tokenizer, images, pipeline.device)
    edited = pipeline.edit_tokens(images, repaint, condition, SEEDS)
    assert torch.equal(edited[~repaint], source[~repaint]) and (edited < pipeline.tokenizer.cfg.codebook_size).all()


def test_pixels_beyond_one_patch_of_the_mask_are_the_inputs(pipeline, images):
    masks = right_half_masks(3)
    repaint = editing.repaint_from_mask(masks, grid=8)
    edited = pipeline.edit(images, repaint, pipeline.conditioner.encode_prompts(PROMPTS), SEEDS)
    assert edited.shape == images.shape and edited.dtype == np.uint8
    far = np.ones((3, 64, 64), dtype=bool)
    far[:, 0:48, 24:64] = False  # token rows 1..4 and columns 4..7, one token further each way
    assert (edited[far] == images[far]).all()
    assert (edited[masks] != images[masks]).any()


def test_an_image_is_edited_the_same_alone_or_in_a_batch(pipeline, images):
    repaint = editing.repaint_at_strength(SEEDS, 0.5, tokens=64)
    condition = pipeline.conditioner.encode_prompts(PROMPTS)
    batch = pipeline.edit_tokens(images, repaint, condition, SEEDS)
    alone = pipeline.edit_tokens(images[1:2], repaint[1:2], condition[1:2], SEEDS[1:2])
    assert torch.equal(batch[1], alone[0])


def test_images_of_another_size_are_refused(pipeline):
    with pytest.raises(ValueError, match=r"\(B, 64, 64, 3\)"):
        small = np.zeros((1, 32, 32, 3), np.uint8)
        pipeline.edit_tokens(small, torch.ones(1, 64, dtype=torch.bool), torch.zeros(1), [0])


@pytest.fixture(scope="module")
def one_step(tiny_bundles):
    torch.set_num_threads(1)
    return load_pipeline(tiny_bundles["one-step"])


def test_refining_an_edit_starts_from_the_edit(one_step, images):
    repaint = editing.repaint_from_mask(right_half_masks(3), grid=8)
    condition = one_step.conditioner.encode_prompts(PROMPTS)
    settings = one_step.tteo.for_request(steps=0)
    candidates = [[seed] for seed in SEEDS]
    refined = one_step.refine_edit(images, repaint, condition, PROMPTS, candidates, settings)
    assert torch.equal(refined.tokens, one_step.edit_tokens(images, repaint, condition, SEEDS))
    assert (to_uint8(refined.images) == one_step.edit(images, repaint, condition, SEEDS)).all()


@pytest.mark.parametrize("target", ["input", "logits"])
def test_refining_an_edit_keeps_its_kept_tokens_and_pixels(one_step, images, target):
    masks = right_half_masks(3)
    repaint = editing.repaint_from_mask(masks, grid=8)
    condition = one_step.conditioner.encode_prompts(PROMPTS)
    settings = one_step.tteo.for_request(steps=3, lr=50.0, target=target, best_of=2)
    candidates = tteo.candidate_seeds(SEEDS, settings.best_of)
    refined = one_step.refine_edit(images, repaint, condition, PROMPTS, candidates, settings)
    source = editing.image_tokens(one_step.tokenizer, images, one_step.device)
    assert torch.equal(refined.tokens[~repaint], source[~repaint])
    assert (refined.tokens < one_step.tokenizer.cfg.codebook_size).all()
    edited = to_uint8(refined.images)
    far = np.ones((3, 64, 64), dtype=bool)
    far[:, 0:48, 24:64] = False
    assert (edited[far] == images[far]).all()
    assert refined.trace.shape == (3, 3)
    assert (refined.reward_after > refined.reward_before).any()  # the steps moved some edit
