"""`softdimo bench offline` and the pieces every benchmark shares, on tiny bundles with tiny settings."""

import json

import pytest
import torch

from softdimo import bench
from softdimo.cli import main
from softdimo.pipeline import load_pipeline



pytestmark = pytest.mark.usefixtures("one_thread")


def test_latency_summary_interpolates_between_order_statistics():
    summary = bench.latency_summary([i / 1000 for i in range(1, 101)])  # 1 … 100 ms
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p95"] == pytest.approx(95.05)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["mean"] == pytest.approx(50.5)
    assert bench.latency_summary([]) == {"p50": None, "p95": None, "p99": None, "mean": None}


def test_ratio_is_none_without_a_denominator():
    assert bench.ratio(6.0, 2.0) == 3.0
    assert bench.ratio(6.0, 0.0) is None and bench.ratio(None, 2.0) is None


def test_command_line_spells_out_the_options_given():
    options = [("--model", "w/a b"), ("--batch-sizes", (1, 2)), ("--steps", None), ("--plot", False), ("--flag", True)]
    expected = "softdimo bench offline --model 'w/a b' --batch-sizes 1 2 --flag"
    assert bench.command_line(["softdimo", "bench", "offline"], options) == expected


def test_markdown_table_formats_numbers_and_missing_values():
    table = bench.markdown_table(["a", "b", "c"], [[1, 0.123456, None], [2, 12345.6, "x"]])
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
    one_step = bench.run_offline(bench.OfflineBench(model=str(tiny_bundles["one-step"]), **tiny), "softdimo bench offline")
    _check_offline(one_step, [None], [1, 2])
    assert one_step["model"]["kind"] == "one-step"

    teacher = bench.run_offline(bench.OfflineBench(model=str(tiny_bundles["text"]), steps=(1, 3), **tiny), "softdimo bench offline")
    _check_offline(teacher, [1, 3], [1, 2])
    flops = {r["steps"]: r["flops_per_image"] for r in teacher["rows"]}
    # Each sampling step is one guided transformer pass; the decoder runs once: more steps, more FLOPs.
    assert flops[3] > flops[1] > one_step["rows"][0]["flops_per_image"] / 2

    with pytest.raises(ValueError, match="masked-diffusion"):
        bench.run_offline(bench.OfflineBench(model=str(tiny_bundles["one-step"]), steps=(4,), **tiny), "")


def test_tteo_step_cost_is_the_difference_per_step(tiny_bundles):
    pipeline = load_pipeline(tiny_bundles["one-step"], "cpu")
    cost = bench.tteo_step_cost(pipeline, steps=3, batch_size=1, repeats=1, warmup=1)
    assert cost["tteo_steps"] == 3 and cost["batch_size"] == 1
    assert cost["forward_s"] > 0 and cost["refine_s"] > 0 and cost["refine_zero_steps_s"] > 0
    assert cost["step_s"] == pytest.approx((cost["refine_s"] - cost["refine_zero_steps_s"]) / 3)
    assert cost["step_over_forward"] == pytest.approx(cost["step_s"] / cost["forward_s"])


def test_cli_refuses_options_that_do_not_apply(tiny_bundles, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["bench", "offline", "--model", str(tiny_bundles["one-step"]), "--steps", "4"])
    assert exit.value.code == 2 and "--steps applies to masked-diffusion bundles" in capsys.readouterr().err
    with pytest.raises(bench.BenchError, match="--batch-sizes must be positive"):
        bench.OfflineBench(model="unused", batch_sizes=(4, 0))


def test_cli_prints_the_table_and_writes_json(tiny_bundles, tmp_path, capsys):
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--model", str(tiny_bundles["one-step"]), "--device", "cpu", "--batch-sizes", "1", "--repeats", "1",
            "--warmup", "1", "--matmul-size", "128", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["machine"]["command"] == "softdimo bench offline " + " ".join(argv[2:])
    assert result["config"]["batch_sizes"] == [1] and result["config"]["repeats"] == 1
    assert printed.startswith("**machine**") and result["machine"]["command"] in printed
    assert "| steps | batch |" in printed and "tiny-one-step" in printed
