"""The one-step generator: Di[M]O's input, per-image determinism, and gradients through soft embeddings."""

import torch

from softdimo.generator import GeneratorSettings, OneStepGenerator
from softdimo.seeding import ImageNoise


def _generator(model, **settings) -> OneStepGenerator:
    return OneStepGenerator(model, GeneratorSettings(**settings))


def test_initial_tokens_mask_exactly_r_init(tiny_text_transformer):
    gen = _generator(tiny_text_transformer, r_init=0.6)
    tokens = gen.initial_tokens(ImageNoise([1, 2, 3]))
    mask_id = tiny_text_transformer.cfg.mask_id
    assert ((tokens == mask_id).sum(-1) == round(64 * 0.6)).all()
    assert (tokens[tokens != mask_id] < mask_id).all()
    assert not torch.equal(tokens[0], tokens[1])


def test_same_seed_same_tokens_whatever_the_batch(tiny_text_transformer, text_conditioner):
    gen = _generator(tiny_text_transformer)
    prompts = ["a red circle", "three blue squares", "a green triangle below a red circle", "a large cyan circle"]
    condition = text_conditioner.encode_prompts(prompts)
    together = gen.generate_tokens(condition, ImageNoise([5, 6, 7, 8]))
    for i in range(4):
        alone = gen.generate_tokens(condition[i : i + 1], ImageNoise([5 + i]))
        assert torch.equal(alone[0], together[i])
    reordered = gen.generate_tokens(condition[[2, 0]], ImageNoise([7, 5]))
    assert torch.equal(reordered[0], together[2]) and torch.equal(reordered[1], together[0])


def test_gradients_reach_the_input_embeddings_through_decode_soft(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    gen = _generator(tiny_text_transformer)
    condition = text_conditioner.encode_prompts(["a red circle", "a blue square"])
    embeddings = gen.initial_embeddings(ImageNoise([3, 4]), condition).detach().requires_grad_(True)
    logits = gen.logits(embeddings, condition)
    image = tiny_tokenizer.decode_soft(logits.softmax(-1))
    image[0, 0].mean().backward()  # a reward that likes red in the first image only
    assert embeddings.grad[0].abs().sum() > 0
    assert embeddings.grad[1].abs().sum() == 0  # images never see each other


def test_sigma_perturbs_the_embeddings(tiny_text_transformer):
    condition = tiny_text_transformer.null_condition(1)
    clean = _generator(tiny_text_transformer, sigma=0.0).initial_embeddings(ImageNoise([9]), condition)
    noisy = _generator(tiny_text_transformer, sigma=0.3).initial_embeddings(ImageNoise([9]), condition)
    tokens = _generator(tiny_text_transformer).initial_tokens(ImageNoise([9]))
    assert torch.allclose(clean, tiny_text_transformer.embed(tokens))
    assert not torch.allclose(clean, noisy)
