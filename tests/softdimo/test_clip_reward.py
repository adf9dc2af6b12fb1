"""The CLIP reward for real images: CLIP's own cosine of image and prompt, differentiable in the image, from a bundle."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tiny_muse import write_clip_reward  # noqa: E402

from softdimo.bundle import read_bundle  # noqa: E402
from softdimo.pipeline import load_reward  # noqa: E402


def test_the_score_is_clip_s_own_cosine_and_has_gradients(tmp_path, one_thread):
    from transformers import CLIPImageProcessor

    bundle = write_clip_reward(tmp_path / "clip")
    reward = load_reward(read_bundle(bundle))
    assert reward.name == "tiny-clip-vit"
    prompts = ["a red circle", "two blue squares"]
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # CLIP's input size: no resizing
    images = torch.tensor(pixels).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    score = reward.score(images, prompts)

    # CLIP's forward on what its own processor and tokenizer make of the same images and prompts
    processor = CLIPImageProcessor.from_pretrained(bundle / "clip")
    inputs = processor(images=list(pixels), return_tensors="pt")
    ids = reward.tokenizer(prompts, padding=True, return_tensors="pt")
    out = reward.model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=inputs.pixel_values)
    expected = out.logits_per_image.diagonal() / reward.model.logit_scale.exp()
    assert torch.allclose(score, expected, atol=1e-5)

    score.sum().backward()
    assert images.grad.abs().sum() > 0
    assert reward.score(images.detach()[:, :, :16, :16], prompts).shape == (2,)  # other sizes are resized
