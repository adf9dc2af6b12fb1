"""The VQ tokenizer: exact patch-dictionary codes, token ids and the soft path decode alike, the soft path is differentiable."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataclasses import replace

from softdimo import shapes
from softdimo.train.tokenizer import fit_dictionary, image_patches
from softdimo.vq import TokenizerConfig, VQTokenizer, to_tensor, to_uint8


def test_fsq_codebook_rows_match_the_quantiser(tiny_fsq_tokenizer: VQTokenizer):
    images = to_tensor(shapes.batch(np.random.default_rng(0), 4)[0])
    codes, tokens = tiny_fsq_tokenizer._quantise(tiny_fsq_tokenizer.encoder(images * 2 - 1) * 3)
    assert tokens.shape == (4, 64) and tokens.max() < tiny_fsq_tokenizer.cfg.codebook_size
    assert torch.allclose(tiny_fsq_tokenizer._grid(tiny_fsq_tokenizer.codebook[tokens]), codes, atol=1e-6)


def test_a_dictionary_of_every_distinct_patch_encodes_exactly():
    cfg = TokenizerConfig(encoder="dictionary", dictionary_size=512, stem=8, channels=(16,), blocks=1)
    images = to_tensor(shapes.batch(np.random.default_rng(5), 200)[0])
    patches = image_patches(cfg, images)
    prototypes = fit_dictionary(patches, cfg.dictionary_size)
    assert len(prototypes) == len(patches.unique(dim=0)) < 512  # sized to what the world draws
    tokenizer = VQTokenizer(replace(cfg, dictionary_size=len(prototypes)))
    tokenizer.encoder.prototypes.copy_(prototypes)
    tokens = tokenizer.encode(images)
    assert torch.equal(prototypes[tokens.flatten()], patches)  # each token names its own patch, pixel for pixel


def test_k_means_dictionary_when_the_world_draws_more_patches_than_codes():
    patches = torch.rand(400, 12, generator=torch.Generator().manual_seed(0))
    prototypes = fit_dictionary(patches, 16)
    assert prototypes.shape == (16, 12)
    nearest = torch.cdist(patches, prototypes).min(-1).values.mean()
    assert nearest < torch.cdist(patches, patches[:16]).min(-1).values.mean()  # better than arbitrary centres


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


def test_token_noise_corrupts_only_where_asked(tiny_tokenizer: VQTokenizer):
    from softdimo.train.tokenizer import palette_targets

    images = shapes.batch(np.random.default_rng(4), 2)[0]
    x, y = to_tensor(images), palette_targets(images)
    none = torch.full((2, 64), -1)
    with torch.no_grad():
        clean = tiny_tokenizer.reconstruction_loss(x, y)
        assert tiny_tokenizer.reconstruction_loss(x, y, none) == clean
        assert tiny_tokenizer.reconstruction_loss(x, y, torch.randint(0, 64, (2, 64))) != clean


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "tiny_fsq_tokenizer"])
def test_codes_depend_only_on_their_own_patch(fixture, request):
    tiny_tokenizer = request.getfixturevalue(fixture)
    image = to_tensor(
        shapes.render(shapes.sample_scene(shapes.parse_prompt("a large red circle"), np.random.default_rng(3)))[None]
    )
    changed = image.clone()
    changed[..., 8:16, 16:24] = torch.tensor([0.0, 1.0, 1.0])[:, None, None]  # repaint the patch at grid (1, 2)
    before, after = tiny_tokenizer.encode(image), tiny_tokenizer.encode(changed)
    differs = (before != after)[0].reshape(tiny_tokenizer.cfg.grid, -1)
    assert differs[1, 2]
    differs[1, 2] = False
    assert not differs.any()


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "tiny_fsq_tokenizer"])
def test_same_patch_content_gets_the_same_code_anywhere(fixture, request):
    tiny_tokenizer = request.getfixturevalue(fixture)
    blank = torch.zeros(1, 3, 64, 64)
    assert tiny_tokenizer.encode(blank).unique().numel() == 1


def test_unknown_encoder_is_refused():
    with pytest.raises(ValueError, match="unknown encoder"):
        VQTokenizer(TokenizerConfig(encoder="vit"))


def test_chunked_decoding_gives_an_image_the_same_pixels_in_any_batch(tiny_tokenizer: VQTokenizer):
    tokens = torch.randint(
        0, tiny_tokenizer.codebook.shape[0], (9, tiny_tokenizer.cfg.grid**2), generator=torch.Generator().manual_seed(3)
    )
    tiny_tokenizer.decode_chunk = 4
    try:
        with torch.inference_mode():
            alone = tiny_tokenizer.decode_indices(tokens[2:3])
            for batch in (tokens[:3], tokens[1:5], tokens, tokens.flip(0)[:7]):
                position = next(i for i, row in enumerate(batch) if torch.equal(row, tokens[2]))
                assert torch.equal(tiny_tokenizer.decode_indices(batch)[position], alone[0])
            tiny_tokenizer.decode_chunk = None
            assert torch.allclose(tiny_tokenizer.decode_indices(tokens[2:3]), alone, atol=1e-5)
    finally:
        tiny_tokenizer.decode_chunk = None
