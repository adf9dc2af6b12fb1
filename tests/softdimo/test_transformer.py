"""The masked transformer is bidirectional, conditioned, and takes soft embeddings in place of ids."""

import torch
import torch.nn.functional as F

from softdimo.transformer import MaskedTransformer, TransformerConfig, perturb_embeddings


def _condition(conditioner, batch=1):
    return conditioner.encode_prompts(["a red circle left of a blue square"] * batch)


def test_a_later_token_changes_an_earlier_logit(tiny_text_transformer, text_conditioner):
    tokens = torch.full((1, 64), tiny_text_transformer.cfg.mask_id)
    changed = tokens.clone()
    changed[0, 63] = 5
    with torch.no_grad():
        a = tiny_text_transformer(tokens, _condition(text_conditioner))
        b = tiny_text_transformer(changed, _condition(text_conditioner))
    assert a.shape == (1, 64, 64)
    assert not torch.allclose(a[0, 0], b[0, 0])


def test_conditioning_changes_the_logits(tiny_text_transformer, text_conditioner):
    tokens = torch.full((1, 64), tiny_text_transformer.cfg.mask_id)
    with torch.no_grad():
        a = tiny_text_transformer(tokens, text_conditioner.encode_prompts(["a red circle"]))
        b = tiny_text_transformer(tokens, text_conditioner.encode_prompts(["a blue circle"]))
    assert not torch.allclose(a, b)


def test_soft_embeddings_of_one_hot_equal_token_ids(tiny_text_transformer, text_conditioner):
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    probs = F.one_hot(tokens, 64).float().requires_grad_()
    with torch.no_grad():
        by_id = tiny_text_transformer(tokens, _condition(text_conditioner, 2))
    by_soft = tiny_text_transformer.forward_embeddings(
        tiny_text_transformer.soft_embed(probs), _condition(text_conditioner, 2)
    )
    assert torch.allclose(by_id, by_soft, atol=1e-5)
    by_soft.sum().backward()
    assert probs.grad.abs().sum() > 0


def test_embedding_noise_hook_keeps_scale():
    e = torch.randn(1000, 16)
    eps = torch.randn(1000, 16)
    assert torch.equal(perturb_embeddings(e, 0.0, eps), e)
    mixed = perturb_embeddings(e, 0.6, eps)
    assert torch.allclose(mixed, 0.6 * eps + 0.8 * e)
    assert abs(mixed.var().item() - 1.0) < 0.1


def test_class_conditional_model_and_real_scale_config_build():
    cls = MaskedTransformer(TransformerConfig(codebook_size=16, tokens=4, width=16, depth=1, heads=2, num_classes=18))
    assert cls(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 18])).shape == (2, 4, 16)
    with torch.device("meta"):  # MaskGen-L-sized: 16 layers, width 1024, 128 tokens, codebook 8192
        big = MaskedTransformer(
            TransformerConfig(
                codebook_size=8192, tokens=128, width=1024, depth=16, heads=16, text_vocab=49408, text_length=77
            )
        )
    assert 250e6 < big.num_parameters() < 300e6


def test_code_features_tie_tokens_with_close_codes(tiny_text_transformer, text_conditioner):
    model = tiny_text_transformer
    table = model.input_table()
    assert table.shape == (65, 32) and torch.equal(
        table[64], model.token_embedding.weight[64]
    )  # the mask row is its own
    tokens = torch.full((1, 64), model.cfg.mask_id)
    with torch.no_grad():
        before = model(tokens, _condition(text_conditioner))
        model.code_vectors[3] += 0.5  # moving one token's code moves that token's logit and only that one
        after = model(tokens, _condition(text_conditioner))
        model.code_vectors[3] -= 0.5
    moved = (before - after).abs().amax(dim=(0, 1))
    assert moved[3] > 0 and moved[torch.arange(64) != 3].max() == 0


def test_grid_positions_start_neighbours_alike_at_a_random_embedding_scale():
    model = MaskedTransformer(
        TransformerConfig(codebook_size=16, tokens=64, width=32, depth=1, heads=2, num_classes=18)
    )
    prefix = model.position[0, :1].clone()
    model.init_grid_positions()
    assert torch.equal(model.position[0, :1], prefix)  # the conditioning's position is left as it was
    grid = model.position[0, 1:].detach().view(8, 8, 32)
    distance = lambda a, b: (grid[a] - grid[b]).norm().item()  # noqa: E731
    assert distance((3, 3), (3, 4)) < distance((3, 3), (3, 7)) and distance((3, 3), (4, 3)) < distance((3, 3), (7, 3))
    assert torch.equal(grid[2, :, :16], grid[2, 5:6, :16].expand(8, 16))  # half the width is the row alone
    assert torch.equal(grid[:, 2, 16:], grid[5:6, 2, 16:].expand(8, 16))  # and half the column alone
    assert 0.5 < grid.std().item() / 0.02 < 2
