"""Checked draws: an image is drawn again from its next proposal (a one-step model's next latent, a teacher's next
derived seed) while the reward scores it below the bar."""

import os

import numpy as np
import pytest
import torch
from tiny_bundles import tiny_latent_generator

from softdimo import editing
from softdimo.bundle import BundleError
from softdimo.conditioning import Conditioner
from softdimo.draw_check import ROUND_SIZE, DrawCheck, checked_draw
from softdimo.generator import OneStepGenerator
from softdimo.pipeline import OneStepPipeline, TeacherPipeline
from softdimo.sampler import SamplerSettings
from softdimo.seeding import ImageNoise, derived_seed
from softdimo.tteo import Chunks, TTEOSettings, candidate_seeds
from softdimo.vq import to_uint8

PROMPTS = ["a red circle", "three cyan triangles", "a blue square left of a red circle", "two green squares"]
SEEDS = [11, 12, 13, 14]


class RedReward:
    """How much red an image shows: any reward does for checking which draw is kept."""

    name = "red"

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return 10 * images[:, 0].mean((1, 2))


def _every_proposal(generator, tokenizer, check, condition, seeds):
    """Each image's reward for each of its proposals, every one drawn: (B, proposals)."""
    noise = ImageNoise(seeds)
    embeddings = generator.token_embeddings(noise)
    proposals = generator.layout_latents(noise, condition, check.proposals, check.prior_temperature)
    gumbel = generator.token_noise(noise)
    scores = []
    with torch.no_grad():
        for j in range(check.proposals):
            logits = generator.logits(generator.with_latent(embeddings, proposals[:, j]), condition)
            images = tokenizer.decode_indices(generator.tokens_from(logits, gumbel))
            scores.append(RedReward().score(images, None))
    return torch.stack(scores, 1), proposals


def test_an_image_is_drawn_from_its_first_proposal_that_clears_the_bar_else_its_best(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    generator = tiny_latent_generator(tiny_text_transformer)
    condition = text_conditioner.encode_prompts(PROMPTS)
    every, proposals = _every_proposal(generator, tiny_tokenizer, DrawCheck("red", 0.0, 4), condition, SEEDS)
    bar = every.flatten().median().item()  # about half the draws clear it
    check = DrawCheck("red", bar, proposals=4)
    draw = checked_draw(generator, tiny_tokenizer, RedReward(), check, condition, PROMPTS, ImageNoise(SEEDS))
    for i in range(len(SEEDS)):
        cleared = (every[i] >= bar).nonzero().flatten().tolist()
        pick = cleared[0] if cleared else every[i].argmax().item()
        assert torch.equal(draw.latent[i], proposals[i, pick])
        assert draw.scores[i].item() == pytest.approx(every[i, pick].item(), abs=1e-5)
        assert draw.draws[i].item() == (pick + 1 if cleared else 4)
    assert 1 < draw.draws.float().mean() < 4  # some images cleared the bar at once, some were drawn again
    # the kept tokens are the chosen latent's image, and the images their decoding
    logits = generator.logits(generator.with_latent(draw.embeddings, draw.latent), condition)
    assert torch.equal(draw.tokens, generator.tokens_from(logits, draw.gumbel))
    assert torch.equal(draw.images, tiny_tokenizer.decode_indices(draw.tokens))


def test_one_proposal_at_the_generators_own_temperature_is_the_unchecked_image(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    generator = tiny_latent_generator(tiny_text_transformer)
    condition = text_conditioner.encode_prompts(PROMPTS)
    check = DrawCheck("red", bar=100.0, proposals=1, prior_temperature=generator.settings.prior_temperature)
    draw = checked_draw(generator, tiny_tokenizer, RedReward(), check, condition, PROMPTS, ImageNoise(SEEDS))
    assert torch.equal(draw.tokens, generator.generate_tokens(condition, ImageNoise(SEEDS)))
    assert draw.draws.tolist() == [1, 1, 1, 1]  # none cleared the bar, and there is no other proposal


def test_a_checked_image_depends_on_its_own_seed_only_and_padded_rounds_change_nothing(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    generator = tiny_latent_generator(tiny_text_transformer)
    condition = text_conditioner.encode_prompts(PROMPTS)
    every, _ = _every_proposal(generator, tiny_tokenizer, DrawCheck("red", 0.0, 4), condition, SEEDS)
    check = DrawCheck("red", every.flatten().median().item(), proposals=4)

    def draw(rows, **kw):
        texts = [PROMPTS[i] for i in rows]
        noise = ImageNoise([SEEDS[i] for i in rows])
        return checked_draw(generator, tiny_tokenizer, RedReward(), check, condition[rows], texts, noise)

    together = draw([0, 1, 2, 3])
    for i in range(4):
        assert torch.equal(draw([i]).tokens[0], together.tokens[i])
    token = ROUND_SIZE.set(lambda n: 8)  # as a compiled runtime runs every round at a bucket's size
    try:
        padded = draw([0, 1, 2, 3])
    finally:
        ROUND_SIZE.reset(token)
    assert torch.equal(padded.tokens, together.tokens) and torch.equal(padded.draws, together.draws)


def test_a_pipeline_draws_generate_and_the_start_of_refine_under_its_check(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    generator = tiny_latent_generator(tiny_text_transformer)
    condition = text_conditioner.encode_prompts(PROMPTS)
    every, _ = _every_proposal(generator, tiny_tokenizer, DrawCheck("red", 0.0, 4), condition, SEEDS)
    check = DrawCheck("red", every.flatten().median().item(), proposals=4)
    parts = {"generator": generator, "tokenizer": tiny_tokenizer, "conditioner": text_conditioner}
    pipeline = OneStepPipeline(**parts, rewards={"red": RedReward()}, tteo=TTEOSettings(), check=check)
    draw = checked_draw(generator, tiny_tokenizer, RedReward(), check, condition, PROMPTS, ImageNoise(SEEDS))
    images = pipeline.generate(condition, SEEDS)
    assert (images == to_uint8(draw.images)).all()
    refined = pipeline.refine(condition, PROMPTS, candidate_seeds(SEEDS, 1), TTEOSettings(steps=0), "red")
    assert torch.equal(refined.tokens, draw.tokens)  # /refine starts from /generate's image
    with pytest.raises(ValueError, match="not among the model's rewards"):
        OneStepPipeline(**parts, rewards={}, tteo=TTEOSettings(), check=check)
    without_prior = {**parts, "generator": OneStepGenerator(generator.model, generator.settings)}
    with pytest.raises(ValueError, match="has none"):
        OneStepPipeline(**without_prior, rewards={"red": RedReward()}, tteo=TTEOSettings(), check=check)
    with pytest.raises(ValueError, match="at least 1"):
        DrawCheck("red", 1.0, proposals=0)


def _teacher(transformer, tokenizer, conditioner, check=None) -> TeacherPipeline:
    sampler = SamplerSettings(steps=3, contrast=True)  # the relation prompt guided away from its contrasts
    return TeacherPipeline(transformer, tokenizer, conditioner, sampler, rewards={"red": RedReward()}, check=check)


def test_a_teacher_keeps_the_first_of_its_seeds_derived_samples_that_clears_the_bar_else_its_best(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    condition = text_conditioner.encode_prompts(PROMPTS)
    plain = _teacher(tiny_text_transformer, tiny_tokenizer, text_conditioner)
    proposal_seeds = [SEEDS] + [[derived_seed(s, j) for s in SEEDS] for j in (1, 2, 3)]
    every = np.stack([plain.generate(condition, seeds) for seeds in proposal_seeds], 1)  # (B, 4, H, W, 3)
    rewards = RedReward().score(torch.from_numpy(every).flatten(0, 1).permute(0, 3, 1, 2) / 255, None).view(4, 4)
    bar = rewards.flatten().median().item()
    checked = _teacher(tiny_text_transformer, tiny_tokenizer, text_conditioner, DrawCheck("red", bar, proposals=4))
    images = checked.generate(condition, SEEDS)
    picks = []
    for i in range(len(SEEDS)):
        cleared = (rewards[i] >= bar - 1e-5).nonzero().flatten().tolist()
        picks.append(cleared[0] if cleared else rewards[i].argmax().item())
        assert (images[i] == every[i, picks[i]]).all()
    assert set(picks) != {0}  # some images were sampled again
    alone = [checked.generate(condition[i : i + 1], SEEDS[i : i + 1])[0] for i in range(len(SEEDS))]
    assert all((a == b).all() for a, b in zip(alone, images))  # an image depends on its own seed only
    with pytest.raises(ValueError, match="not among the model's rewards"):
        TeacherPipeline(tiny_text_transformer, tiny_tokenizer, text_conditioner, plain.sampler, check=checked.check)


def test_a_checked_teacher_edit_keeps_its_kept_tokens_and_checks_what_it_shows(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    condition = text_conditioner.encode_prompts(PROMPTS)
    sources = to_uint8(
        tiny_tokenizer.decode_indices(torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(3)))
    )
    repaint = editing.repaint_at_strength(SEEDS, 0.5, 64)
    plain = _teacher(tiny_text_transformer, tiny_tokenizer, text_conditioner)
    kept = editing.Kept.of(tiny_tokenizer, sources, repaint, "cpu")
    proposal_seeds = [SEEDS] + [[derived_seed(s, j) for s in SEEDS] for j in (1, 2)]
    every = torch.stack([plain.fill(kept, condition, seeds) for seeds in proposal_seeds], 1)  # (B, 3, N)
    shown = torch.stack([editing.decode_edit(tiny_tokenizer, every[:, j], kept) for j in range(3)], 1)
    rewards = RedReward().score(shown.flatten(0, 1), None).view(4, 3)
    bar = rewards.flatten().median().item()
    checked = _teacher(tiny_text_transformer, tiny_tokenizer, text_conditioner, DrawCheck("red", bar, proposals=3))
    tokens = checked.fill(kept, condition, SEEDS)
    for i in range(len(SEEDS)):
        cleared = (rewards[i] >= bar - 1e-5).nonzero().flatten().tolist()
        pick = cleared[0] if cleared else rewards[i].argmax().item()
        assert torch.equal(tokens[i], every[i, pick])
    assert torch.equal(tokens[~repaint], kept.tokens[~repaint])


def test_a_teacher_bundle_carries_its_check_is_served_under_it_and_refuses_a_prior_temperature(tmp_path, tiny_bundles):
    import base64

    import httpx
    from conftest import metric

    from benchmarks.running import server_thread
    from server.settings import Settings
    from softdimo.bundle import read_bundle, seal_folder
    from softdimo.images import decode_image
    from softdimo.pipeline import load_pipeline, load_transformer, save_teacher

    teacher, folder = read_bundle(tiny_bundles["text"]), tmp_path / "checked-teacher"
    check = DrawCheck("tiny-clip", bar=1e9, proposals=2)  # no image clears it: each draws both
    save_teacher(
        load_transformer(teacher),
        folder,
        name="tiny-checked-teacher",
        conditioner=Conditioner.from_dict(teacher.config["conditioner"]),
        sampler=SamplerSettings(steps=2),
        tokenizer_reference=os.path.relpath(tiny_bundles["tokenizer"], folder),
        reward_references=[os.path.relpath(tiny_bundles["reward"], folder)],
        check=check,
        dtype=None,
    )
    pipeline = load_pipeline(folder)
    assert pipeline.check == check and list(pipeline.rewards) == ["tiny-clip"]
    expected = pipeline.generate(pipeline.conditioner.encode_prompts(["a red circle"] * 2), [5, 6])
    settings = Settings(weights=[str(folder)], device="cpu", max_batch_size=8, max_wait_ms=5)
    with server_thread(settings) as url:
        answer = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "n": 2, "seed": 5}, timeout=60)
        assert answer.status_code == 200, answer.text
        text = httpx.get(f"{url}/metrics").text
    served = [decode_image(base64.b64decode(item["b64_json"])) for item in answer.json()["data"]]
    assert all((a == b).all() for a, b in zip(served, expected))
    assert metric(text, "softdimo_checked_draws_total", endpoint="/generate", model="tiny-checked-teacher") == 2 * 2
    config = read_bundle(folder).config
    assert "prior_temperature" not in config["check"]
    seal_folder(folder, {**config, "check": {**config["check"], "prior_temperature": 2.0}})
    with pytest.raises(BundleError, match="no layout prior"):
        load_pipeline(folder)


def test_refine_in_chunks_draws_its_checked_start_in_pieces_and_pauses_between_rounds(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    import numpy as np

    from softdimo import editing, shapes

    generator = tiny_latent_generator(tiny_text_transformer)
    condition = text_conditioner.encode_prompts(PROMPTS)
    every, _ = _every_proposal(generator, tiny_tokenizer, DrawCheck("red", 0.0, 4), condition, SEEDS)
    check = DrawCheck("red", every.flatten().median().item(), proposals=4)
    draws = checked_draw(generator, tiny_tokenizer, RedReward(), check, condition, PROMPTS, ImageNoise(SEEDS)).draws
    events = []

    class Recorded(RedReward):
        def score(self, images, prompts):
            events.append(len(images))
            return super().score(images, prompts)

    parts = {"generator": generator, "tokenizer": tiny_tokenizer, "conditioner": text_conditioner}
    pipeline = OneStepPipeline(**parts, rewards={"red": Recorded()}, tteo=TTEOSettings(), check=check)
    candidates, settings = candidate_seeds(SEEDS, 1), TTEOSettings(steps=2, lr=1000.0)
    whole = pipeline.refine(condition, PROMPTS, candidates, settings, "red")
    events.clear()
    chunks = Chunks(3, pause=lambda: events.append("pause"))
    chunked = pipeline.refine(condition, PROMPTS, candidates, settings, "red", chunks=chunks)
    assert torch.equal(chunked.tokens, whole.tokens) and torch.equal(chunked.images, whole.images)
    assert torch.allclose(chunked.trace, whole.trace, atol=1e-5)
    # The start in pieces of images 0-2 and image 3: each the check's rounds over its images still below the bar
    # (draws > j), then TTEO's own pass over the piece; then two steps and the end, each in the same two pieces.
    pieces = []
    for piece in (slice(0, 3), slice(3, 4)):
        rounds = [int((draws[piece] > j).sum()) for j in range(check.proposals)]
        pieces += [pending for pending in rounds if pending] + [len(draws[piece])]
    assert len(pieces) > 4  # some images were drawn again: a piece of the start ran more than one round
    pieces += [3, 1] * 3
    assert events == [event for size in pieces for event in ("pause", size)][1:]  # a pause between any two

    images = shapes.batch(np.random.default_rng(3), len(PROMPTS))[0]
    masks = np.zeros((len(PROMPTS), 64, 64), dtype=bool)
    masks[:, 8:40, 32:64] = True
    repaint = editing.repaint_from_mask(masks, grid=8)
    edit = (images, repaint, condition, PROMPTS, candidates, settings, "red")
    whole, chunked = pipeline.refine_edit(*edit), pipeline.refine_edit(*edit, chunks=Chunks(3, pause=lambda: None))
    assert torch.equal(chunked.tokens, whole.tokens) and torch.equal(chunked.images, whole.images)


def test_a_reward_reads_the_prompt_or_the_class_of_a_conditioning(text_conditioner):
    assert text_conditioner.reward_texts(text_conditioner.encode_prompts(PROMPTS)) == PROMPTS
    classes = Conditioner.shapes_class()
    texts = classes.reward_texts(classes.encode_labels([0, 5]))
    assert texts == [classes.reward_text(None, 0), classes.reward_text(None, 5)]


def test_an_edit_is_checked_on_what_it_shows_and_keeps_what_it_keeps(
    tiny_text_transformer, tiny_tokenizer, text_conditioner
):
    import numpy as np

    from softdimo import editing, shapes

    generator = tiny_latent_generator(tiny_text_transformer)
    condition = text_conditioner.encode_prompts(PROMPTS)
    images = shapes.batch(np.random.default_rng(3), len(PROMPTS))[0]
    masks = np.zeros((len(PROMPTS), 64, 64), dtype=bool)
    masks[:, 8:40, 32:64] = True
    repaint = editing.repaint_from_mask(masks, grid=8)
    kept = editing.Kept.of(tiny_tokenizer, images, repaint, "cpu")
    bar = 5.0
    check = DrawCheck("red", bar, proposals=4)
    parts = {"generator": generator, "tokenizer": tiny_tokenizer, "conditioner": text_conditioner}
    pipeline = OneStepPipeline(**parts, rewards={"red": RedReward()}, tteo=TTEOSettings(), check=check)
    draw = checked_draw(generator, tiny_tokenizer, RedReward(), check, condition, PROMPTS, ImageNoise(SEEDS), kept)
    assert torch.equal(draw.tokens[~repaint], kept.tokens[~repaint])  # kept tokens stay the input's
    assert torch.equal(draw.images, editing.decode_edit(tiny_tokenizer, draw.tokens, kept))  # the reward saw the edit
    assert torch.allclose(draw.scores, RedReward().score(draw.images, PROMPTS))
    assert ((draw.scores >= bar) | (draw.draws == 4)).all() and (draw.draws > 1).any()
    edited = pipeline.edit(images, repaint, condition, SEEDS)
    assert (edited == to_uint8(draw.images)).all()
    refined = pipeline.refine_edit(
        images, repaint, condition, PROMPTS, candidate_seeds(SEEDS, 1), TTEOSettings(steps=0)
    )
    assert torch.equal(refined.tokens, draw.tokens)  # TTEO on an edit starts from the checked edit


def test_the_server_counts_the_draws_its_check_makes(tmp_path, tiny_bundles):
    import httpx
    from conftest import metric
    from tiny_bundles import write_checked_one_step

    from benchmarks.running import server_thread
    from server.settings import Settings
    from softdimo.draw_check import DRAWS_SEEN
    from softdimo.pipeline import load_pipeline

    bundle = write_checked_one_step(
        tmp_path / "checked", tiny_bundles["tokenizer"], tiny_bundles["reward"], "tiny-checked", 1e9
    )
    pipeline = load_pipeline(bundle)
    seen = []
    token = DRAWS_SEEN.set(seen.append)
    try:
        pipeline.generate(pipeline.conditioner.encode_prompts(PROMPTS), SEEDS)
    finally:
        DRAWS_SEEN.reset(token)
    assert [d.tolist() for d in seen] == [[4, 4, 4, 4]]  # no image clears a bar this high: each drew all 4
    settings = Settings(weights=[str(bundle)], device="cpu", max_batch_size=8, max_wait_ms=5)
    with server_thread(settings) as url:
        answer = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "n": 3, "seed": 5})
        assert answer.status_code == 200, answer.text
        text = httpx.get(f"{url}/metrics").text
    assert metric(text, "softdimo_checked_draws_total", endpoint="/generate", model="tiny-checked") == 3 * 4
