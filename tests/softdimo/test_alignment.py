"""The alignment model's joint scorer: one logit per image-prompt pair, differentiable in pixels, trainable."""

import numpy as np
import torch

from softdimo import shapes
from softdimo.reward import AlignmentConfig, AlignmentModel
from softdimo.text import PromptTokenizer
from softdimo.train.reward import contrastive_loss, hard_negative
from softdimo.vq import to_tensor

TINY_JOINT = AlignmentConfig(width=16, channels=(8, 8, 8, 8), text_layers=1, text_heads=2, joint_layers=1)


def _batch(size: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [shapes.sample_prompt(rng) for _ in range(size)]
    images = to_tensor(np.stack([shapes.render(shapes.sample_scene(p, rng)) for p in prompts]))
    negatives = [[hard_negative(p, rng).text() for _ in range(2)] for p in prompts]
    return images, [p.text() for p in prompts], negatives


def test_joint_scores_are_per_pair_and_differentiable_in_pixels():
    torch.manual_seed(0)
    model = AlignmentModel(TINY_JOINT, PromptTokenizer(shapes.VOCABULARY, 12)).eval()
    images, prompts, _ = _batch(3, seed=1)
    images.requires_grad_(True)
    scores = model.similarity(images, prompts)
    assert scores.shape == (3,)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    with torch.no_grad():  # an image's score depends on its own prompt only, not on its batch-mates
        alone = model.similarity(images[1:2], prompts[1:2])
        assert torch.allclose(alone, scores[1:2], atol=1e-5)
        swapped = model.similarity(images[:2], [prompts[1], prompts[0]])
        assert not torch.allclose(swapped, scores[:2])


def test_joint_loss_trains_the_scorer_to_prefer_true_prompts():
    torch.manual_seed(0)
    model = AlignmentModel(TINY_JOINT, PromptTokenizer(shapes.VOCABULARY, 12))
    images, prompts, negatives = _batch(8, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = contrastive_loss(model, images, prompts, negatives).item()
    for _ in range(40):
        loss = contrastive_loss(model, images, prompts, negatives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        true = model.similarity(images, prompts)
        false = model.similarity(images, [row[0] for row in negatives])
    assert (true > false).all()
