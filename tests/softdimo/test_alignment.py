"""The alignment model's grounding: objects found where they are, relations scored from their places, trainable."""

import numpy as np
import torch

from softdimo import shapes
from softdimo.reward import AlignmentConfig, AlignmentModel, relation_rows
from softdimo.text import PromptTokenizer
from softdimo.train.reward import contrastive_loss, grounding_loss, hard_negative, object_places
from softdimo.vq import to_tensor

TINY_GROUNDED = AlignmentConfig(width=16, channels=(8, 8, 8), text_layers=1, text_heads=2, grounding=True)


def _relation_batch(size: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [shapes.sample_prompt(rng, kinds=("relation",)) for _ in range(size)]
    scenes = [shapes.sample_scene(p, rng) for p in prompts]
    images = to_tensor(np.stack([shapes.render(scene) for scene in scenes]))
    negatives = [[hard_negative(p, rng).text() for _ in range(2)] for p in prompts]
    return images, prompts, negatives, scenes


def _swapped(prompt: shapes.Prompt) -> str:
    return shapes.Prompt("relation", prompt.objects[::-1], relation=prompt.relation).text()


def test_relation_scores_read_the_places_as_the_judge_does():
    model = AlignmentModel(TINY_GROUNDED, PromptTokenizer(shapes.VOCABULARY, 12))
    positions = torch.zeros(1, shapes.NUM_CLASSES, 2)
    red_circle, blue_square = shapes.class_label(0, 0), shapes.class_label(2, 1)
    positions[0, red_circle] = torch.tensor([-0.6, 0.1])  # left of the blue square, and far enough
    positions[0, blue_square] = torch.tensor([0.4, 0.0])
    texts = [f"a red circle {r} a blue square" for r in shapes.RELATIONS] + ["a red circle and a blue square"]
    scores = model.grounding.relation_scores(
        positions.expand(len(texts), -1, -1), relation_rows(texts, torch.device("cpu"))
    )
    left, right, above, below, pair = scores.tolist()
    assert left > -0.1 and pair == 0.0  # a kept relation costs (almost) nothing; a pair has no relation term
    assert max(right, above, below) < left - 1


def test_grounded_scores_are_per_pair_and_differentiable_in_pixels():
    torch.manual_seed(0)
    model = AlignmentModel(TINY_GROUNDED, PromptTokenizer(shapes.VOCABULARY, 12)).eval()
    images, prompts, _, _ = _relation_batch(3, seed=1)
    texts = [p.text() for p in prompts]
    images.requires_grad_(True)
    scores = model.similarity(images, texts)
    assert scores.shape == (3,)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    with torch.no_grad():  # an image's score depends on its own prompt only, not on its batch-mates
        alone = model.similarity(images[1:2], texts[1:2])
        assert torch.allclose(alone, scores[1:2], atol=1e-5)


def test_training_finds_the_objects_and_prefers_the_true_relation_to_the_swapped_one():
    torch.manual_seed(0)
    model = AlignmentModel(TINY_GROUNDED, PromptTokenizer(shapes.VOCABULARY, 12))
    images, prompts, negatives, scenes = _relation_batch(8, seed=2)
    texts = [p.text() for p in prompts]
    places, known = object_places(scenes, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = grounding_loss(model, images, places, known).item()
    for _ in range(100):
        loss = contrastive_loss(model, images, texts, negatives) + grounding_loss(model, images, places, known)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert grounding_loss(model, images, places, known).item() < 0.4 * first
    with torch.no_grad():
        true = model.similarity(images, texts)
        swapped = model.similarity(images, [_swapped(p) for p in prompts])
    assert (true > swapped).all()


def test_hard_negative_images_compete_with_each_prompts_own_image():
    torch.manual_seed(0)
    model = AlignmentModel(TINY_GROUNDED, PromptTokenizer(shapes.VOCABULARY, 12)).eval()
    images, prompts, negatives, _ = _relation_batch(4, seed=3)
    texts = [p.text() for p in prompts]
    with torch.no_grad():
        alone = contrastive_loss(model, images, texts, negatives)
        twin = contrastive_loss(model, images, texts, negatives, negative_images=images[:, None])
        scores = torch.stack([model.similarity(images, [t] * len(texts)) for t in texts])  # (prompt, image)
    # a negative image identical to the prompt's own is a competitor as strong as the answer: the prompt -> image
    # half of the loss rises by log(1 + p) per prompt, p the answer's probability among the batch's images
    answer = scores.softmax(-1).diagonal()
    assert torch.allclose(twin - alone, 0.5 * torch.log1p(answer).mean(), atol=1e-5)
