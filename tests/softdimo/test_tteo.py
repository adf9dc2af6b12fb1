"""TTEO raises a reward, starts from /generate's image, and treats each image of a batch on its own."""

import pytest
import torch

from softdimo.generator import GeneratorSettings, OneStepGenerator
from softdimo.seeding import ImageNoise
from softdimo.tteo import Chunks, TTEOSettings, candidate_seeds, refine


class Redness:
    """A reward any user could plug in: how red the image is, whatever the prompt says."""

    name = "redness"

    def score(self, images, prompts):
        return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


def _refine(model, tokenizer, conditioner, prompts, seeds, temperature=1.0, candidates=None, chunks=None, **settings):
    """TTEO against redness; `candidates` (each image's best_of seeds) default to those `seeds` draw in one request."""
    generator = OneStepGenerator(model, GeneratorSettings(temperature=temperature))
    settings = TTEOSettings(**settings)
    return refine(
        generator=generator,
        tokenizer=tokenizer,
        reward=Redness(),
        condition=conditioner.encode_prompts(prompts),
        prompts=prompts,
        candidates=candidates or candidate_seeds(seeds, settings.best_of),
        settings=settings,
        chunks=chunks,
    )


def test_tteo_raises_the_reward(tiny_text_transformer, tiny_tokenizer, text_conditioner):
    out = _refine(
        tiny_text_transformer,
        tiny_tokenizer,
        text_conditioner,
        ["a red circle", "a blue square"],
        [1, 2],
        steps=15,
        lr=1000.0,
        temperature=0.0,
    )
    assert out.trace.shape == (15, 2)
    assert (out.trace[-1] > out.trace[0]).all()
    assert (out.reward_after > out.reward_before).all()
    assert torch.allclose(out.reward_after, Redness().score(out.images, None))


def test_tteo_on_logits_also_raises_the_reward(tiny_text_transformer, tiny_tokenizer, text_conditioner):
    out = _refine(
        tiny_text_transformer,
        tiny_tokenizer,
        text_conditioner,
        ["a red circle"],
        [3],
        steps=10,
        lr=500.0,
        target="logits",
        temperature=0.0,
    )
    assert out.trace[-1, 0] > out.trace[0, 0] and out.reward_after[0] > out.reward_before[0]


def test_tteo_on_the_layout_latent_raises_the_reward_and_needs_a_latent(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    import pytest

    from softdimo.train.latent import latent_student

    torch.manual_seed(0)
    model = latent_student(tiny_text_transformer, 4)
    torch.nn.init.normal_(model.latent_input.weight, std=1.0)  # a latent that moves the image, as a trained one does
    out = _refine(
        model,
        tiny_tokenizer,
        text_conditioner,
        ["a red circle"],
        [3],
        steps=10,
        lr=50.0,
        target="latent",
        temperature=0.0,
    )
    assert out.trace[-1, 0] > out.trace[0, 0]
    start = _refine(
        model, tiny_tokenizer, text_conditioner, ["a red circle"], [3], steps=0, target="latent", temperature=0.0
    )
    assert torch.equal(
        start.tokens,
        OneStepGenerator(model, GeneratorSettings(temperature=0.0)).generate_tokens(
            text_conditioner.encode_prompts(["a red circle"]), ImageNoise([3])
        ),
    )  # it starts from /generate's image
    with pytest.raises(ValueError, match="layout latent"):
        _refine(
            tiny_text_transformer, tiny_tokenizer, text_conditioner, ["a red circle"], [3], steps=1, target="latent"
        )
    with pytest.raises(ValueError, match="target must be one of"):
        TTEOSettings(target="weights")


def test_zero_steps_returns_the_generated_image(tiny_text_transformer, tiny_tokenizer, text_conditioner):
    out = _refine(
        tiny_text_transformer,
        tiny_tokenizer,
        text_conditioner,
        ["a red circle", "two green squares"],
        [10, 11],
        steps=0,
    )
    generator = OneStepGenerator(tiny_text_transformer, GeneratorSettings())
    tokens = generator.generate_tokens(
        text_conditioner.encode_prompts(["a red circle", "two green squares"]), ImageNoise([10, 11])
    )
    assert torch.equal(out.tokens, tokens)
    assert torch.equal(out.reward_before, out.reward_after)


def test_candidates_start_at_the_image_seed_and_no_two_seeds_share_one():
    rows = candidate_seeds(list(range(64)), 4)
    assert [row[0] for row in rows] == list(range(64))  # best_of = 1 starts from /generate's image
    drawn = [seed for row in rows for seed in row]
    assert len(set(drawn)) == len(drawn)  # a sweep over consecutive seeds draws no candidate twice
    assert all(0 <= seed < 2**63 for seed in drawn)
    assert candidate_seeds([2**63 - 1], 3) == candidate_seeds([2**63 - 1, 5], 3)[:1]  # batch-mates change nothing


def test_an_image_does_not_depend_on_its_batch_mates(tiny_text_transformer, tiny_tokenizer, text_conditioner):
    prompts = ["a red circle", "three cyan triangles", "a blue square left of a red circle"]
    rows = candidate_seeds([40, 41, 42], 2)
    settings = dict(steps=4, lr=1000.0, best_of=2)
    parts = (tiny_text_transformer, tiny_tokenizer, text_conditioner)
    together = _refine(*parts, prompts, None, candidates=rows, **settings)
    # on these seeds the images keep different candidates, so a choice made for the batch as a whole would show
    assert together.seeds == [rows[0][0], rows[1][0], rows[2][1]]
    for i, row in enumerate(rows):
        alone = _refine(*parts, prompts[i : i + 1], None, candidates=[row], **settings)
        assert alone.seeds == together.seeds[i : i + 1]
        assert torch.equal(alone.tokens[0], together.tokens[i])
        assert torch.equal(alone.reward_before[0], together.reward_before[i])
        assert torch.allclose(alone.trace[:, 0], together.trace[:, i], atol=1e-5)
    single = _refine(tiny_text_transformer, tiny_tokenizer, text_conditioner, prompts, [20, 21, 22], steps=4, lr=5.0)
    single_alone = _refine(tiny_text_transformer, tiny_tokenizer, text_conditioner, prompts[2:], [22], steps=4, lr=5.0)
    assert torch.equal(single.tokens[2], single_alone.tokens[0])
    assert torch.allclose(single.trace[:, 2], single_alone.trace[:, 0], atol=1e-5)


def test_best_of_keeps_the_best_starting_candidate(tiny_text_transformer, tiny_tokenizer, text_conditioner):
    parts = (tiny_text_transformer, tiny_tokenizer, text_conditioner, ["a red circle"])
    many = _refine(*parts, [40], steps=0, best_of=6)
    (row,) = candidate_seeds([40], 6)
    alone = [_refine(*parts, [seed], steps=0).reward_before[0].item() for seed in row]
    assert len(set(alone)) > 1  # the candidates differ, so the choice is a real one
    assert many.seeds[0] == row[max(range(6), key=alone.__getitem__)]
    assert many.reward_before[0].item() == pytest.approx(max(alone), abs=1e-5)


def test_a_step_hook_sees_every_step_and_stops_images_without_disturbing_the_rest(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    import torch

    prompts, seeds = ["a red circle", "a blue square"], [7, 8]
    full = _refine(tiny_text_transformer, tiny_tokenizer, text_conditioner, prompts, seeds, steps=6, lr=1000.0)
    seen = []

    def drop_the_first_after_two_steps(step, rewards):
        seen.append((step, rewards.clone()))
        return torch.tensor([step < 2, True])

    generator = OneStepGenerator(tiny_text_transformer, GeneratorSettings())
    settings = TTEOSettings(steps=6, lr=1000.0)
    common = dict(
        generator=generator,
        tokenizer=tiny_tokenizer,
        reward=Redness(),
        condition=text_conditioner.encode_prompts(prompts),
        prompts=prompts,
        candidates=candidate_seeds(seeds, 1),
        settings=settings,
    )
    hooked = refine(**common, on_step=drop_the_first_after_two_steps)
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5, 6]
    rewards = torch.stack([r for _, r in seen])  # (steps, images)
    assert torch.equal(rewards[:, 1], full.trace[:, 1]) and torch.equal(
        hooked.tokens[1], full.tokens[1]
    )  # the batch-mate: exactly as without
    assert torch.equal(rewards[2:, 0], rewards[2:3, 0].expand(4))  # the dropped image is no longer optimised

    calls = []
    stopped = refine(**common, on_step=lambda step, rewards: calls.append(step) or torch.tensor([False, False]))
    assert calls == [1] and stopped.trace.shape == (1, 2)  # nobody wanted: the loop ends


def test_a_request_gets_what_it_asks_for_else_the_models_settings_and_one_candidate():
    saved = TTEOSettings(steps=7, lr=0.5, best_of=4, target="logits")  # a bundle that saved best_of 4
    assert saved.for_request() == TTEOSettings(steps=7, lr=0.5, best_of=1, target="logits")
    asked = dict(steps=2, lr=3.0, best_of=3, target="input")
    assert saved.for_request(**asked) == TTEOSettings(**asked)


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("target", ["input", "logits", "latent"])
def test_tteo_in_chunks_gives_what_one_batch_gives(
    size, target, tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    from softdimo.train.latent import latent_student

    model = tiny_text_transformer
    if target == "latent":
        torch.manual_seed(0)
        model = latent_student(tiny_text_transformer, 4)
        torch.nn.init.normal_(model.latent_input.weight, std=1.0)
    prompts = ["a red circle", "three cyan triangles", "a blue square left of a red circle"]
    rows = candidate_seeds([40, 41, 42], 2)  # six candidates: pieces of 4 divide neither them nor the three images
    lr = {"input": 1000.0, "logits": 500.0, "latent": 50.0}[target]
    settings = dict(steps=4, lr=lr, best_of=2, target=target, temperature=0.0)
    whole = _refine(model, tiny_tokenizer, text_conditioner, prompts, None, candidates=rows, **settings)
    chunks = Chunks(size, pause=lambda: None)
    chunked = _refine(
        model, tiny_tokenizer, text_conditioner, prompts, None, candidates=rows, chunks=chunks, **settings
    )
    assert (whole.trace[-1] != whole.trace[0]).any()  # the steps moved the images: there is something to compare
    assert chunked.seeds == whole.seeds
    assert torch.equal(chunked.tokens, whole.tokens) and torch.equal(chunked.images, whole.images)
    assert torch.allclose(chunked.reward_before, whole.reward_before, atol=1e-5)
    assert torch.allclose(chunked.reward_after, whole.reward_after, atol=1e-5)
    assert torch.allclose(chunked.trace, whole.trace, atol=1e-5)


def test_chunks_pause_between_every_two_pieces_of_work(tiny_text_transformer, tiny_tokenizer, text_conditioner):
    events = []

    class Recorded(Redness):
        def score(self, images, prompts):
            events.append(len(images))
            return super().score(images, prompts)

    prompts = ["a red circle", "a blue square", "two green squares"]

    def refined(chunks):
        events.clear()
        refine(
            generator=OneStepGenerator(tiny_text_transformer, GeneratorSettings()),
            tokenizer=tiny_tokenizer,
            reward=Recorded(),
            condition=text_conditioner.encode_prompts(prompts),
            prompts=prompts,
            candidates=candidate_seeds([1, 2, 3], 2),
            settings=TTEOSettings(steps=2, best_of=2),
            chunks=chunks,
        )
        return list(events)

    def paused(sizes):
        """Reward calls of these sizes with a pause between any two."""
        return [event for size in sizes for event in ("pause", size)][1:]

    def pause():
        events.append("pause")

    # one reward call per piece: the six candidates in twos, then each step and the end over the images in 2 + 1
    assert refined(Chunks(2, pause)) == paused([2, 2, 2, 2, 1, 2, 1, 2, 1])
    assert refined(Chunks(None, pause)) == paused([6, 3, 3, 3])  # whole batches: between the start, steps and end
    assert refined(None) == [6, 3, 3, 3]
    with pytest.raises(ValueError, match="at least one image"):
        Chunks(0, pause)
