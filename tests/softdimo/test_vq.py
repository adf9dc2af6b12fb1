"""The VQ tokenizer: token ids and the soft path decode alike; the soft path is differentiable."""

import numpy as np
import torch
import torch.nn.functional as F

from softdimo import shapes
from softdimo.vq import VQTokenizer, to_tensor, to_uint8


def test_codebook_rows_match_the_quantiser(tiny_tokenizer: VQTokenizer):
    images = to_tensor(shapes.batch(np.random.default_rng(0), 4)[0])
    codes, tokens = tiny_tokenizer._quantise(tiny_tokenizer.encoder(images * 2 - 1) * 3)
    assert tokens.shape == (4, 64) and tokens.max() < tiny_tokenizer.cfg.codebook_size
    assert torch.allclose(tiny_tokenizer._grid(tiny_tokenizer.codebook[tokens]), codes, atol=1e-6)


def test_decode_soft_of_one_hot_equals_decode_indices(tiny_tokenizer: VQTokenizer):
    tokens = torch.randint(0, tiny_tokenizer.cfg.codebook_size, (3, 64), generator=torch.Generator().manual_seed(1))
    one_hot = F.one_hot(tokens, tiny_tokenizer.cfg.codebook_size).float()
    with torch.no_grad():
        soft, hard = tiny_tokenizer.decode_soft(one_hot), tiny_tokenizer.decode_indices(tokens)
    assert soft.shape == (3, 3, 64, 64)
    assert torch.allclose(soft, hard, atol=1e-6)


def test_decode_soft_passes_gradients_to_the_distribution(tiny_tokenizer: VQTokenizer):
    logits = torch.randn(2, 64, tiny_tokenizer.cfg.codebook_size, requires_grad=True)
    image = tiny_tokenizer.decode_soft(logits.softmax(-1))
    image[:, 0].mean().backward()  # push the red channel
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_images_round_trip_through_uint8():
    images = shapes.batch(np.random.default_rng(2), 2)[0]
    assert (to_uint8(to_tensor(images)) == images).all()


def test_reconstruction_loss_trains(tiny_tokenizer: VQTokenizer):
    from softdimo.train.tokenizer import palette_targets

    torch.manual_seed(0)
    images = shapes.batch(np.random.default_rng(3), 8)[0]
    x, y = to_tensor(images), palette_targets(images)
    tiny_tokenizer.train()
    optimizer = torch.optim.Adam(tiny_tokenizer.parameters(), lr=1e-2)
    first = tiny_tokenizer.reconstruction_loss(x, y).item()
    for _ in range(30):
        loss = tiny_tokenizer.reconstruction_loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
