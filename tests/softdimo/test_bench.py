"""`softdimo bench offline` and the pieces every benchmark shares, on tiny bundles with tiny settings."""

import json
import time

import numpy as np
import pytest
import torch

from softdimo import bench, bench_run, tables, timing, warmup
from softdimo.cli import main
from softdimo.pipeline import load_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")


def test_latency_summary_interpolates_between_order_statistics():
    summary = timing.latency_summary([i / 1000 for i in range(1, 101)])  # 1 … 100 ms
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p95"] == pytest.approx(95.05)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["mean"] == pytest.approx(50.5)
    assert timing.latency_summary([]) == {"p50": None, "p95": None, "p99": None, "mean": None}


def test_ratio_is_none_without_a_denominator():
    assert timing.ratio(6.0, 2.0) == 3.0
    assert timing.ratio(6.0, 0.0) is None and timing.ratio(None, 2.0) is None


def test_command_line_spells_out_the_options_given():
    options = [("--model", "w/a b"), ("--batch-sizes", (1, 2)), ("--steps", None), ("--plot", False), ("--flag", True)]
    expected = "softdimo bench offline --model 'w/a b' --batch-sizes 1 2 --flag"
    assert bench_run.command_line(["softdimo", "bench", "offline"], options) == expected


def test_markdown_table_formats_numbers_and_missing_values():
    table = tables.markdown_table(["a", "b", "c"], [[1, 0.123456, None], [2, 12345.6, "x"]])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.123 | – |", "| 2 | 12,346 | x |"]


def test_count_flops_counts_a_matmul_exactly():
    layer = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(4, 32)
    assert bench.count_flops(lambda: layer(x)) == 2 * 4 * 32 * 16


def _check_offline(result: dict, steps: list, batch_sizes: list) -> None:
    assert set(result) >= {"bench", "machine", "config", "model", "matmul", "rows"}
    assert set(result["machine"]) >= {"cpu", "torch", "device", "date", "command", "torch_threads"}
    peak = result["matmul"]["peak_flops"]["fp32"]
    assert peak > 0
    assert [(r["steps"], r["batch_size"]) for r in result["rows"]] == [(s, b) for s in steps for b in batch_sizes]
    for row in result["rows"]:
        assert row["seconds_per_batch"] > 0 and row["flops_per_image"] > 0
        assert row["images_per_s"] == pytest.approx(row["batch_size"] / row["seconds_per_batch"])
        assert row["achieved_flops"] == pytest.approx(row["flops_per_image"] * row["images_per_s"])
        assert row["fraction_of_peak"] == pytest.approx(row["achieved_flops"] / peak)


def test_offline_one_step_and_teacher(tiny_bundles):
    tiny = {"batch_sizes": (1, 2), "repeats": 1, "warmup": 1, "matmul_size": 256, "device": "cpu"}
    one_step = bench.run_offline(
        bench.OfflineBench(model=str(tiny_bundles["one-step"]), **tiny), "softdimo bench offline"
    )
    _check_offline(one_step, [None], [1, 2])
    assert one_step["model"]["kind"] == "one-step"

    teacher = bench.run_offline(
        bench.OfflineBench(model=str(tiny_bundles["text"]), steps=(1, 3), **tiny), "softdimo bench offline"
    )
    _check_offline(teacher, [1, 3], [1, 2])
    flops = {r["steps"]: r["flops_per_image"] for r in teacher["rows"]}
    # Each sampling step is one guided transformer pass; the decoder runs once: more steps, more FLOPs.
    assert flops[3] > flops[1] > one_step["rows"][0]["flops_per_image"] / 2
    # The decoder runs once per image whatever the steps: its share is the same FLOPs in both tables.
    decoder = one_step["arms"][0]["decoder_flops_per_image"]
    assert 0 < decoder < one_step["rows"][0]["flops_per_image"]
    assert teacher["arms"][0]["decoder_flops_per_image"] == decoder
    assert f"the tokenizer decoder's are {decoder / 1e6:,.1f}" in bench.offline_table(one_step)

    with pytest.raises(ValueError, match="masked-diffusion"):
        bench.run_offline(bench.OfflineBench(model=str(tiny_bundles["one-step"]), steps=(4,), **tiny), "")


def test_a_teacher_that_guides_contrasts_is_warmed_on_a_prompt_that_has_them(tiny_bundles):
    from dataclasses import replace

    teacher = load_pipeline(tiny_bundles["text"])
    condition, _ = warmup.example_inputs(teacher, 1)
    assert len(warmup.warm_up_conditions(teacher, condition)) == 1
    teacher.sampler = replace(teacher.sampler, contrast=True)
    example, contrasted = warmup.warm_up_conditions(teacher, condition)
    assert teacher.conditioner.contrasts(example) is None and teacher.conditioner.contrasts(contrasted) is not None


class SlowReward:
    """A reward whose every score takes `seconds` more: one per TTEO step, plus the candidates' and the result's."""

    def __init__(self, reward, seconds: float):
        self.reward, self.seconds, self.name = reward, seconds, reward.name

    def score(self, images, prompts):
        time.sleep(self.seconds)
        return self.reward.score(images, prompts)


def test_tteo_step_cost_is_what_a_step_adds_to_a_refine_call(tiny_bundles):
    pipeline = load_pipeline(tiny_bundles["one-step"], "cpu")
    pipeline.rewards = {name: SlowReward(reward, 0.25) for name, reward in pipeline.rewards.items()}
    cost = bench.tteo_step_cost(pipeline, steps=3, batch_size=1, repeats=1, warmup=1)
    assert cost["tteo_steps"] == 3 and cost["batch_size"] == 1
    # a step scores once (0.25 s) and computes for milliseconds; a refine call also scores twice at any steps
    assert 0.25 <= cost["step_s"] < 0.35
    assert 1.25 <= cost["refine_s"] < 1.6 and 0.5 <= cost["refine_zero_steps_s"] < 0.7
    assert cost["forward_s"] < 0.1 and cost["step_over_forward"] > 2.5


def test_cli_refuses_options_that_do_not_apply(tiny_bundles, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["bench", "offline", "--model", str(tiny_bundles["one-step"]), "--steps", "4"])
    assert exit.value.code == 2 and "--steps applies to masked-diffusion bundles" in capsys.readouterr().err
    with pytest.raises(bench_run.BenchError, match="--batch-sizes must be positive"):
        bench.OfflineBench(model="unused", batch_sizes=(4, 0))


def test_cli_prints_the_table_and_writes_json(tiny_bundles, tmp_path, capsys):
    out = tmp_path / "offline.json"
    argv = [
        "bench",
        "offline",
        "--model",
        str(tiny_bundles["one-step"]),
        "--device",
        "cpu",
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--matmul-size",
        "128",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["machine"]["command"] == "softdimo bench offline " + " ".join(argv[2:])
    assert result["config"]["batch_sizes"] == [1] and result["config"]["repeats"] == 1
    assert printed.startswith("**machine**") and result["machine"]["command"] in printed
    assert "| steps | batch |" in printed and "tiny-one-step" in printed


# ---------------------------------------------------------------- comparisons and runtime options


def test_one_value_holds_for_both_arms_and_two_values_compare():
    assert bench_run.arm_values({"model": ("a",), "precision": ("fp32",)}) == [{"model": "a", "precision": "fp32"}]
    assert bench_run.arm_values({"model": ("a",), "precision": ("fp32", "bf16")}) == [
        {"model": "a", "precision": "fp32"},
        {"model": "a", "precision": "bf16"},
    ]
    with pytest.raises(bench_run.BenchError, match="--model takes one value, or two"):
        bench_run.arm_values({"model": ("a", "b", "c"), "precision": ("fp32",)})
    with pytest.raises(bench_run.BenchError, match="--precision must be one of"):
        bench.OfflineBench(model="unused", precision=("fp32", "fp16"))
    with pytest.raises(bench_run.BenchError, match="--compile takes on or off"):
        bench.OfflineBench(model="unused", compile=("yes",))
    with pytest.raises(bench_run.BenchError, match="--model .* or --config"):
        bench.OfflineBench(model="unused", config="maskgen-l")


def test_rounds_interleave_so_each_arm_runs_first_in_half_of_them():
    order = []
    values = timing.interleaved([lambda: order.append("A") or 1.0, lambda: order.append("B") or 2.0], rounds=4)
    assert order == ["A", "B", "B", "A", "A", "B", "B", "A"] and values == [[1.0] * 4, [2.0] * 4]
    stats = timing.compare_rounds([10.0, 20.0, 10.0], [15.0, 20.0, 30.0])
    assert stats == {"a": 10.0, "b": 20.0, "ratio": 1.5, "ratio_min": 1.0, "ratio_max": 3.0, "rounds": 3}
    assert timing.compare_rounds([0.0], [1.0])["ratio"] is None  # A did nothing: no ratio, not a division by zero


def _check_comparison(result: dict, batch_sizes: list, rounds: int) -> None:
    assert [row["batch_size"] for row in result["comparison"]] == batch_sizes
    for row in result["comparison"]:
        a, b = row["rounds_images_per_s"]["A"], row["rounds_images_per_s"]["B"]
        assert len(a) == len(b) == rounds and min(a + b) > 0
        assert row["a"] == pytest.approx(np.median(a)) and row["b"] == pytest.approx(np.median(b))
        assert row["ratio"] == pytest.approx(np.median(np.array(b) / np.array(a)))
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        for label, rate in (("A", row["a"]), ("B", row["b"])):
            assert (
                row["arms"][label]["images_per_s"] == pytest.approx(rate) and row["arms"][label]["flops_per_image"] > 0
            )


def test_offline_compares_two_bundles_and_two_settings_of_one(tiny_bundles, capsys):
    tiny = {"batch_sizes": (1, 2), "repeats": 1, "warmup": 1, "matmul_size": 128, "device": "cpu", "rounds": 3}
    one_step, teacher = str(tiny_bundles["one-step"]), str(tiny_bundles["text"])
    two = bench.run_offline(bench.OfflineBench(model=(one_step, teacher), **tiny), "softdimo bench offline")
    assert [(arm["label"], arm["name"], arm["kind"]) for arm in two["arms"]] == [
        ("A", "tiny-one-step", "one-step"),
        ("B", "tiny-text", "masked-diffusion"),
    ]
    _check_comparison(two, [1, 2], 3)
    row = two["comparison"][0]["arms"]
    assert row["B"]["flops_per_image"] > row["A"]["flops_per_image"]  # 4 guided sampling steps against one pass
    table = bench.offline_table(two)
    assert (
        "A: `tiny-one-step`" in table
        and "B: `tiny-text`" in table
        and "| batch | A images/s | B images/s | B / A |" in table
    )

    settings = bench.run_offline(
        bench.OfflineBench(model=one_step, precision=("fp32", "bf16"), **tiny), "softdimo bench offline"
    )
    assert [arm["runtime"]["precision"] for arm in settings["arms"]] == ["fp32", "bf16"]
    assert settings["matmul"]["peak_flops"]["bf16"] > 0  # a bf16 arm is held against the bf16 matmul rate
    _check_comparison(settings, [1, 2], 3)
    assert "(one-step; bf16)" in bench.offline_table(settings)


def test_offline_at_scale_runs_a_random_network_and_holds_it_against_a_stated_peak(monkeypatch):
    from softdimo.transformer import TransformerConfig

    tiny = TransformerConfig(codebook_size=64, tokens=16, width=32, depth=1, heads=2, text_vocab=30, text_length=5)
    monkeypatch.setitem(bench.SCALES, "tiny", tiny)
    config = bench.OfflineBench(
        config="tiny", batch_sizes=(1, 2), repeats=1, warmup=1, matmul_size=128, device="cpu", peak_tflops=2.0
    )
    result = bench.run_offline(config, "softdimo bench offline")
    assert result["model"] == {"path": "tiny", "name": "tiny", "kind": "network"}
    assert result["matmul"]["stated_bf16_peak_flops"] == 2.0e12
    for row in result["rows"]:
        assert row["flops_per_image"] > 2 * 16 * 32 * 64  # at least the output head's matmul over 16 tokens
        assert row["fraction_of_stated_bf16_peak"] == pytest.approx(row["achieved_flops"] / 2.0e12)
    assert "% of stated bf16 peak" in bench.offline_table(result) and "no decoder" in bench.offline_table(result)
    with pytest.raises(bench_run.BenchError, match="unknown --config"):
        bench.run_offline(bench.OfflineBench(config="nope", batch_sizes=(1,), device="cpu"), "")


def test_the_stated_bf16_peak_comes_from_the_device_name_unless_given(monkeypatch):
    cuda = torch.device("cuda")
    for name, peak in (
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756.0e12),
        ("NVIDIA A100-SXM4-80GB", 312.0e12),
        ("NVIDIA GeForce GTX 1080", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bench.stated_bf16_peak(cuda) == peak
    assert bench.stated_bf16_peak(torch.device("cpu")) is None and bench.stated_bf16_peak(cuda, 100.0) == 100.0e12


def test_cli_compares_two_bundles(tiny_bundles, tmp_path, capsys):
    out = tmp_path / "compare.json"
    argv = [
        "bench",
        "offline",
        "--model",
        str(tiny_bundles["one-step"]),
        str(tiny_bundles["one-step-class"]),
        "--device",
        "cpu",
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--matmul-size",
        "128",
        "--rounds",
        "2",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [arm["name"] for arm in result["arms"]] == ["tiny-one-step", "tiny-one-step-class"]
    assert result["config"]["model"] == [str(tiny_bundles["one-step"]), str(tiny_bundles["one-step-class"])]
    assert "B / A" in printed and f"{result['comparison'][0]['ratio']:.3g}" in printed
