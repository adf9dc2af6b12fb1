"""MaskGIT sampling: schedules, exact masking, and seeded determinism whatever the batch."""

import math

import pytest
import torch

from softdimo.conditioning import Conditioner
from softdimo.seeding import ImageNoise
from softdimo.sampler import SamplerSettings, guided_logits, mask_ratio, mask_tokens, sample


@pytest.mark.parametrize("schedule", ["cosine", "arccos", "linear"])
def test_schedules_run_from_all_masked_to_none(schedule):
    assert float(mask_ratio(0.0, schedule)) == pytest.approx(1.0)
    assert float(mask_ratio(1.0, schedule)) == pytest.approx(0.0, abs=1e-6)
    values = mask_ratio(torch.linspace(0, 1, 11), schedule)
    assert (values[1:] <= values[:-1]).all()
    assert float(mask_ratio(0.5, "cosine")) == pytest.approx(math.cos(math.pi / 4))


def test_mask_tokens_masks_exactly_the_rounded_count():
    tokens = torch.arange(10).repeat(3, 1)
    masked, mask = mask_tokens(tokens, torch.tensor([0.0, 0.34, 1.0]), torch.rand(3, 10), mask_id=99)
    assert mask.sum(-1).tolist() == [1, 3, 10]
    assert (masked[mask] == 99).all() and torch.equal(masked[~mask], tokens[~mask])


def test_sampler_fills_every_token_and_is_deterministic_per_seed(tiny_text_transformer, text_conditioner):
    prompts = ["a red circle", "two blue squares", "a green triangle above a red circle"]
    settings = SamplerSettings(steps=6)
    condition = text_conditioner.encode_prompts(prompts)
    batch = sample(tiny_text_transformer, condition, ImageNoise([10, 11, 12]), settings)
    assert (batch < tiny_text_transformer.cfg.codebook_size).all()
    alone = sample(tiny_text_transformer, condition[1:2], ImageNoise([11]), settings)
    assert torch.equal(batch[1], alone[0])
    again = sample(tiny_text_transformer, condition, ImageNoise([10, 11, 12]), settings)
    assert torch.equal(batch, again)
    other = sample(tiny_text_transformer, condition, ImageNoise([13, 14, 15]), settings)
    assert not torch.equal(batch, other)


def test_contrast_guides_a_relation_away_from_its_perpendicular_relations_and_leaves_other_prompts_alone(
    tiny_text_transformer,
    text_conditioner,
):
    model, conditioner = tiny_text_transformer, text_conditioner
    prompts = ["a red circle", "a green triangle above a red circle", "two blue squares"]
    condition = conditioner.encode_prompts(prompts)
    contrasts = conditioner.contrasts(condition)
    others, has = contrasts
    assert has.tolist() == [False, True, False]
    contrast_texts = conditioner.prompt_tokenizer.decode(others[1])
    assert contrast_texts == ["a green triangle left of a red circle", "a green triangle right of a red circle"]
    tokens = torch.randint(0, model.cfg.codebook_size, (3, model.cfg.tokens))
    tokens[:, ::3] = model.cfg.mask_id
    with torch.no_grad():
        guided = guided_logits(model, tokens, condition, 3.0, contrasts)
        plain = guided_logits(model, tokens, condition, 3.0)
        cond = model(tokens, condition)
        away = torch.stack([model(tokens[1:2], others[1, j : j + 1])[0] for j in range(2)]).mean(0)
    assert torch.allclose(guided[1], cond[1] + 3.0 * (cond[1] - away), atol=1e-4)
    assert torch.equal(guided[[0, 2]], plain[[0, 2]])  # exactly: the null prompt is their reference
    settings = SamplerSettings(steps=6, contrast=True)
    batch = sample(model, condition, ImageNoise([10, 11, 12]), settings, contrasts)
    assert torch.equal(
        batch[[0, 2]], sample(model, condition, ImageNoise([10, 11, 12]), SamplerSettings(steps=6))[[0, 2]]
    )
    alone = sample(model, condition[1:2], ImageNoise([11]), settings, conditioner.contrasts(condition[1:2]))
    assert torch.equal(batch[1], alone[0])  # whatever else was in the batch


def test_contrast_is_only_guided_where_a_prompt_has_contrasts(text_conditioner):
    assert text_conditioner.contrasts(text_conditioner.encode_prompts(["a red circle", "three cyan triangles"])) is None
    assert Conditioner.shapes_class().contrasts(torch.tensor([3, 5])) is None
    assert SamplerSettings(contrast=1).contrast is True
    with pytest.raises(ValueError, match="contrast is on or off"):
        SamplerSettings(contrast=0.5)


def test_teacher_bundle_and_cli_generate_png_files(tmp_path):
    from tiny_bundles import write_all

    from softdimo.cli import main
    from softdimo.images import decode_image

    bundles = write_all(tmp_path)
    out = tmp_path / "out"
    args = [
        "generate",
        "--model",
        str(bundles["text"]),
        "--prompt",
        "a red circle",
        "-n",
        "2",
        "--seed",
        "5",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["5.png", "6.png"]
    assert decode_image((out / "5.png").read_bytes()).shape == (64, 64, 3)
    assert (
        main(
            [
                "generate",
                "--model",
                str(bundles["text"]),
                "--prompt",
                "a purple circle",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "generate",
                "--model",
                str(bundles["class"]),
                "--class-label",
                "17",
                "-n",
                "1",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    # refine reads the class of a class-conditional model as the reward's prompt
    refine = [
        "refine",
        "--model",
        str(bundles["one-step-class"]),
        "--class-label",
        "3",
        "-n",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(refine) == 0
    assert {"0-refined.png", "1-refined.png"} <= {p.name for p in out.iterdir()}
    assert (
        main(
            ["refine", "--model", str(bundles["one-step"]), "--class-label", "3", "--out", str(out), "--device", "cpu"]
        )
        == 2
    )


def test_teacher_training_draws_kinds_by_weight_and_can_start_positions_on_the_grid(tmp_path, monkeypatch, one_thread):
    from tiny_bundles import tiny_tokenizer, tiny_transformer_config

    from softdimo.train import teacher as stage
    from softdimo.train.batches import WorldBatch
    from softdimo.transformer import MaskedTransformer

    drawn_kinds = []

    def recorded(**draw):
        drawn_kinds.append(draw["kinds"])
        return WorldBatch(**draw)

    monkeypatch.setattr(stage, "WorldBatch", recorded)
    conditioner, tokenizer = Conditioner.shapes_text(), tiny_tokenizer()
    cfg = tiny_transformer_config(conditioner, tokenizer.cfg.codebook_size)
    training = stage.TeacherTraining(
        steps=1, batch_size=2, lr=1e-9, warmup=1, eval_every=0, kind_weights=(1, 1, 2, 2, 2), position_init="grid"
    )
    model = stage.train_teacher(
        run_dir=tmp_path,
        tokenizer=tokenizer,
        conditioner=conditioner,
        cfg=cfg,
        training=training,
        sampler=SamplerSettings(steps=2),
        device=torch.device("cpu"),
    )
    assert drawn_kinds == [("single", "sized", "pair", "pair", "count", "count", "relation", "relation")]
    grid = MaskedTransformer(cfg)
    grid.init_grid_positions()
    image = slice(cfg.prefix_length, None)
    assert torch.allclose(
        model.position[0, image], grid.position[0, image], atol=1e-6
    )  # one step at lr 1e-9 moves nothing


def test_guidance_runs_only_on_the_steps_of_its_interval(tiny_text_transformer, text_conditioner, monkeypatch):
    condition = text_conditioner.encode_prompts(["a red circle", "two blue squares"])
    rows = []  # images the network reads at each step: 2 unguided, 4 guided (each with its null prompt)
    forward = tiny_text_transformer.forward
    monkeypatch.setattr(
        tiny_text_transformer, "forward", lambda tokens, cond: rows.append(len(tokens)) or forward(tokens, cond)
    )
    late = sample(
        tiny_text_transformer, condition, ImageNoise([3, 4]), SamplerSettings(steps=6, guidance=5.0, guidance_start=0.5)
    )
    assert rows == [2, 2, 2, 4, 4, 4]
    rows.clear()
    empty = SamplerSettings(steps=6, guidance=5.0, guidance_start=0.5, guidance_end=0.5)
    unguided = SamplerSettings(steps=6, guidance=0.0)
    assert torch.equal(
        sample(tiny_text_transformer, condition, ImageNoise([3, 4]), empty),
        sample(tiny_text_transformer, condition, ImageNoise([3, 4]), unguided),
    )
    assert rows == [2] * 12 and late.shape == (2, 64)
    settings = SamplerSettings(steps=8, guidance=3.0, guidance_start=0.25, guidance_end=0.75)
    assert [settings.guidance_at(step) for step in range(8)] == [0, 0, 3, 3, 3, 3, 0, 0]
    with pytest.raises(ValueError, match="guidance runs over"):
        SamplerSettings(guidance_start=0.6, guidance_end=0.4)


def test_confidence_noise_changes_which_tokens_are_committed_first(tiny_text_transformer, text_conditioner):
    condition = text_conditioner.encode_prompts(["a red circle"])
    plain = sample(tiny_text_transformer, condition, ImageNoise([9]), SamplerSettings(steps=6, choice_temperature=0.0))
    noisy = sample(tiny_text_transformer, condition, ImageNoise([9]), SamplerSettings(steps=6, choice_temperature=4.5))
    assert not torch.equal(plain, noisy)
