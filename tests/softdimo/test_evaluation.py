"""Evaluation tables: the rows each kind of bundle gets, through the CLI, with grids and JSON."""

import json

import pytest
import torch

from softdimo.cli import main
from softdimo.features import FeatureNet, FeatureNetConfig
from softdimo.pipeline import save_features


def _features(folder):
    torch.manual_seed(0)
    net = FeatureNet(FeatureNetConfig(channels=(8, 8, 8), features=16))
    return save_features(net, folder, name="tiny-features")


def test_eval_writes_a_table_per_bundle(tmp_path, capsys):
    from tiny_bundles import write_all

    bundles = write_all(tmp_path / "b")
    features = _features(tmp_path / "features")
    out = tmp_path / "results.json"
    args = [
        "eval",
        str(bundles["tokenizer"]),
        str(bundles["text"]),
        str(bundles["one-step"]),
        "--prompts",
        "10",
        "--steps",
        "2",
        "4",
        "--tteo-steps",
        "2",
        "--best-of",
        "2",
        "--features",
        str(features),
        "--json",
        str(out),
        "--grid",
        str(tmp_path / "grids"),
        "--device",
        "cpu",
        "--coverage-prompts",
        "5",
        "--coverage-seeds",
        "4",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert (
        "| model | single | sized | pair | count | relation | pass | coverage | min | commonest | Fréchet | ms / image |"
        in printed
    )
    tables = json.loads(out.read_text())
    names = [[row["name"] for row in t["rows"]] for t in tables]
    assert names[0] == ["tiny-tokenizer reconstructions", "real images (reference)"]
    assert names[1] == ["tiny-text (2 steps)", "tiny-text (4 steps)", "real images (reference)"]
    assert names[2] == [
        "tiny-one-step (1 step)",
        "tiny-one-step + TTEO 2",
        "tiny-one-step best-of-2",
        "tiny-one-step best-of-2 + TTEO 2",
        "real images (reference)",
    ]
    reference = tables[1]["rows"][-1]
    assert reference["overall"] == 1.0 and set(reference["per_kind"]) == {
        "single",
        "sized",
        "pair",
        "count",
        "relation",
    }
    for table in tables:  # every row measures coverage; a second draw of the world covers the first's layouts
        assert all(row["coverage"]["prompts"] == 5 and row["coverage"]["seeds"] == 4 for row in table["rows"])
        assert table["rows"][-1]["coverage"]["mean"] == pytest.approx(1.0, abs=0.1)
    assert len(list((tmp_path / "grids").glob("*.png"))) == 1 + 2 + 4


def test_eval_of_a_reward_reports_hard_negative_accuracy_per_kind(tmp_path, capsys):
    from tiny_bundles import write_reward

    from softdimo import evaluation
    from softdimo.bundle import read_bundle
    from softdimo.pipeline import load_reward
    from softdimo.train.reward import hard_negative_wins

    reward = write_reward(tmp_path / "reward")
    out = tmp_path / "results.json"
    args = [
        "eval",
        str(reward),
        "--prompts",
        "40",
        "--features",
        str(_features(tmp_path / "features")),
        "--json",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "the true prompt scores above all 4 hard negative prompts for" in printed
    assert "the true image scores above all 4 hard negative images for" in printed
    accuracy = json.loads(out.read_text())[0]["hard_negative_accuracy"]
    # the same held-out prompts and wins, counted here per kind: each share is that kind's wins over its prompts
    prompts, prompt_wins, image_wins = hard_negative_wins(
        load_reward(read_bundle(reward)).model, count=40, seed=evaluation.HELD_OUT_SEED, placement="grid"
    )
    for side, wins in (("prompts", prompt_wins.tolist()), ("images", image_wins.tolist())):
        expected = {"overall": sum(wins) / len(wins)}
        for kind in {p.kind for p in prompts}:
            won = [w for w, p in zip(wins, prompts) if p.kind == kind]
            expected[kind] = sum(won) / len(won)
        assert accuracy[side] == pytest.approx(expected)
    assert accuracy["prompts"] != accuracy["images"]  # on this reward the two sides differ, so a swap would show


def test_eval_overrides_tteo_settings_and_names_an_unknown_one(tmp_path, capsys):
    from tiny_bundles import write_all, write_checked_one_step

    bundles = write_all(tmp_path / "b")
    features = str(_features(tmp_path / "features"))
    out = tmp_path / "results.json"
    args = [
        "eval",
        str(bundles["one-step"]),
        "--prompts",
        "5",
        "--tteo-steps",
        "1",
        "--features",
        features,
        "--device",
        "cpu",
        "--coverage-prompts",
        "0",
    ]
    assert main([*args, "--tteo", "target=logits", "lr=0.5", "--json", str(out)]) == 0
    names = [row["name"] for row in json.loads(out.read_text())[0]["rows"]]
    assert names[:2] == [
        "tiny-one-step (target logits, lr 0.5) (1 step)",
        "tiny-one-step (target logits, lr 0.5) + TTEO 1",
    ]
    assert main([*args, "--tteo", "rate=0.5"]) == 2
    assert "no TTEOSettings setting rate; settings are steps, lr, best_of, target" in capsys.readouterr().err
    assert main([*args, "--generator", "temperature=0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["rows"][0]["name"] == "tiny-one-step (temperature 0) (1 step)"
    assert main([*args, "--generator", "warmth=1"]) == 2
    assert "no GeneratorSettings setting warmth" in capsys.readouterr().err
    assert main([*args, "--check", "bar=1"]) == 2  # the tiny one-step model has no layout prior to propose from
    assert "tiny-one-step: a draw check chooses among a layout prior's proposals" in capsys.readouterr().err
    checked = write_checked_one_step(tmp_path / "b" / "checked", bundles["tokenizer"], bundles["reward"], "ck", 0.0)
    args[1] = str(checked)
    assert main([*args, "--check", "proposals=2", "bar=1e9", "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["rows"][0]["name"] == "ck (proposals 2, bar 1000000000.0) (1 step)"


def test_eval_of_a_one_step_model_without_a_reward_says_so_instead_of_tteo_rows(tmp_path, capsys):
    from tiny_bundles import tiny_transformer, write_all

    from softdimo.conditioning import Conditioner
    from softdimo.generator import GeneratorSettings, OneStepGenerator
    from softdimo.pipeline import save_one_step
    from softdimo.tteo import TTEOSettings

    bundles = write_all(tmp_path / "b")
    conditioner = Conditioner.shapes_class()
    plain = save_one_step(
        OneStepGenerator(tiny_transformer(conditioner), GeneratorSettings()),
        tmp_path / "b" / "plain",
        name="plain",
        conditioner=conditioner,
        tokenizer_reference="../tokenizer",
        reward_references=[],
        tteo=TTEOSettings(),
        dtype=None,
    )
    assert bundles["tokenizer"] == tmp_path / "b" / "tokenizer"
    features = str(_features(tmp_path / "features"))
    args = [
        "eval",
        str(plain),
        "--prompts",
        "4",
        "--tteo-steps",
        "1",
        "--best-of",
        "2",
        "--features",
        features,
        "--device",
        "cpu",
        "--coverage-prompts",
        "0",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "plain names no reward model: no TTEO or best-of rows." in printed
    assert "plain (1 step)" in printed and "TTEO" not in printed.replace("no TTEO", "")


def test_eval_samples_through_a_runtime_as_the_server_would(tmp_path, capsys):
    from tiny_bundles import write_all

    bundles = write_all(tmp_path / "b")
    features = str(_features(tmp_path / "features"))
    out = tmp_path / "results.json"
    base = [
        "eval",
        str(bundles["one-step"]),
        "--prompts",
        "4",
        "--features",
        features,
        "--device",
        "cpu",
        "--coverage-prompts",
        "0",
    ]
    assert main([*base, "--json", str(out)]) == 0
    plain = json.loads(out.read_text())[0]["rows"][0]
    assert main([*base, "--compile", "--json", str(out)]) == 0
    compiled = json.loads(out.read_text())[0]["rows"][0]
    # the compiled network draws the same images: the same judgement and features
    assert compiled["name"] == "tiny-one-step (compile True) (1 step)"
    assert (compiled["overall"], compiled["frechet"]) == (plain["overall"], pytest.approx(plain["frechet"], abs=1e-3))
