"""`softdimo bench serve|steps|refine` and the load generator, against real servers on tiny bundles for ~1 s each."""

import asyncio
import json
import statistics

import pytest

from benchmarks.cli import main
from benchmarks.load import Load, RequestResult, Target, run_load, summarize, target_for
from benchmarks.refine import RefineBench, refine_table, run_refine
from benchmarks.serve import ServeBench, run_serve, serve_table
from benchmarks.server_under_test import ServerSpec, model_cards, running_server
from benchmarks.steps import StepsBench, run_steps, steps_table
from softdimo.bench_run import BenchError

FAST = {"device": "cpu", "duration_s": 0.5, "warmup_s": 0.1, "repeats": 1, "timeout_s": 30.0, "server": "thread"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_level(level: dict, concurrency: int) -> None:
    assert level["concurrency"] == concurrency
    assert level["ok"] == level["requests"] > 0 and level["images"] == level["ok"]  # n = 1 per request, no failures
    assert level["status_429"] == level["status_5xx"] == level["errors"] == level["other_status"] == 0
    assert level["images_per_s"] == pytest.approx(level["images"] / level["elapsed_s"]) and level["images_per_s"] > 0
    lat = level["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert level["queue_ms"] >= 0 and level["compute_ms"] > 0
    assert level["batches"] >= 1
    # the server observed every answered request in every stage of its way (server/timeline.py)
    assert [stage["count"] for stage in level["stages"].values()] == [level["ok"]] * len(level["stages"])
    assert all(stage["sum_s"] > 0 for stage in level["stages"].values())


def _processes_running(*words: str) -> list[int]:
    """Processes whose command line holds every one of `words`."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(word in command for word in words):
            found.append(int(pid))
    return found


def test_summarize_counts_every_outcome():
    samples = [
        RequestResult(0.010, 200, images=2, queue_s=0.001, compute_s=0.008),
        RequestResult(0.030, 200, images=2, queue_s=0.003, compute_s=0.020),
        RequestResult(0.001, 429),
        RequestResult(0.002, 503),
        RequestResult(5.0, 0),
        RequestResult(0.001, 422),
    ]
    level = summarize(samples, [0.5, 0.5], concurrency=3, batches=(6.0, 4.0))
    assert (level["requests"], level["ok"], level["images"]) == (6, 2, 4)
    assert (level["status_429"], level["status_5xx"], level["errors"], level["other_status"]) == (1, 1, 1, 1)
    assert level["images_per_s"] == pytest.approx(4.0)  # 4 images over two 0.5 s rounds
    assert level["latency_ms"]["p50"] == pytest.approx(20.0)  # answered requests only
    assert level["queue_ms"] == pytest.approx(2.0) and level["compute_ms"] == pytest.approx(14.0)
    assert level["mean_batch_size"] == pytest.approx(1.5) and level["batches"] == 4
    assert summarize([], [1.0], concurrency=1, batches=(0.0, 0.0))["mean_batch_size"] is None


def test_options_are_checked_before_anything_starts():
    with pytest.raises(BenchError, match="--concurrency must be positive"):
        ServeBench(model="unused", concurrency=(1, 0))
    with pytest.raises(BenchError, match="--endpoint"):
        ServeBench(model="unused", endpoint="edit")
    with pytest.raises(BenchError, match="--warmup-s must be 0 or more"):
        RefineBench(model="unused", warmup_s=-1)


def test_load_generator_is_bounded_and_counts_refusals(tiny_bundles):
    spec = ServerSpec(weights=(str(tiny_bundles["one-step"]),), device="cpu", max_batch_size=2, mode="thread")
    with running_server(spec) as url:
        assert url.startswith("http://127.0.0.1:")
        target = target_for(model_cards(url)["tiny-one-step"], "/generate")
        level = asyncio.run(run_load(url, target, Load(concurrency=3, duration_s=30, max_requests=7)))
        assert level["requests"] == level["ok"] == 7  # the count bound ends the round long before the duration
        assert level["mean_batch_size"] == pytest.approx(7 / level["batches"])

        invalid = Target(path="/generate", model="tiny-one-step", body={"model": "tiny-one-step", "n": 1})  # no prompt
        level = asyncio.run(run_load(url, invalid, Load(concurrency=2, duration_s=30, max_requests=4)))
        assert level["requests"] == level["other_status"] == 4 and level["ok"] == 0 and level["images_per_s"] == 0
        assert level["latency_ms"]["p50"] is None


def test_serve_sweeps_batched_against_unbatched(tiny_bundles, tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = [
        "bench",
        "serve",
        "--model",
        str(tiny_bundles["one-step"]),
        "--concurrency",
        "1",
        "4",
        "--device",
        "cpu",
        "--max-batch-size",
        "4",
        "--duration-s",
        "0.5",
        "--warmup-s",
        "0.1",
        "--repeats",
        "1",
        "--server",
        "thread",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "plots"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["machine"]["command"] == "softdimo bench serve " + " ".join(argv[2:])
    assert printed.out.startswith("**machine**") and "| concurrency | requests | images/s |" in printed.out
    assert "| concurrency | parse ms | queue ms | compute ms | encode ms | write ms |" in printed.out

    runs = result["runs"]
    assert (runs["batched"]["max_batch_size"], runs["unbatched"]["max_batch_size"]) == (4, 1)
    for run in runs.values():
        for level, concurrency in zip(run["levels"], [1, 4], strict=True):
            _check_level(level, concurrency)
    assert all(level["mean_batch_size"] == 1 for level in runs["unbatched"]["levels"])
    assert all(1 <= level["mean_batch_size"] <= 4 for level in runs["batched"]["levels"])

    for row, batched, unbatched in zip(
        result["comparison"], runs["batched"]["levels"], runs["unbatched"]["levels"], strict=True
    ):
        assert row["ratio"] == pytest.approx(batched["images_per_s"] / unbatched["images_per_s"])
    offline = result["offline"]
    assert offline["batched_images_per_s"] == pytest.approx(4 / offline["batch_s"]) and offline["batch_1_s"] > 0
    lat = result["latency_at_1"]
    assert lat["p50_ms"] == runs["batched"]["levels"][0]["latency_ms"]["p50"]
    assert lat["overhead_ms"] == pytest.approx(lat["p50_ms"] - offline["batch_1_s"] * 1000) and lat["target_ms"] == 5
    sat = result["saturation"]
    assert sat["server_images_per_s"] == max(level["images_per_s"] for level in runs["batched"]["levels"])
    assert sat["fraction"] == pytest.approx(sat["server_images_per_s"] / offline["batched_images_per_s"])

    plots = tmp_path / "plots"
    try:
        import matplotlib  # noqa: F401

        assert (plots / "throughput.png").is_file() and (plots / "latency.png").is_file()
    except ImportError:
        assert "matplotlib is not installed" in printed.err and not plots.exists()


def test_steps_compares_one_step_with_teacher_in_one_server_process(tiny_bundles, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child server inherits the environment (all but SOFTDIMO_*)
    config = StepsBench(
        one_step=str(tiny_bundles["one-step"]),
        teacher=str(tiny_bundles["text"]),
        steps=(1, 2),
        concurrency=2,
        max_batch_size=2,
        **{**FAST, "server": "process"},
    )
    result = run_steps(config, "softdimo bench steps")
    _check_level(result["one_step"]["load"], 2)
    assert [load["steps"] for load in result["teacher"]["loads"]] == [1, 2]
    for load in result["teacher"]["loads"]:
        _check_level(load, 2)
    for row, load in zip(result["rows"], result["teacher"]["loads"], strict=True):
        assert row["teacher_images_per_s"] == load["images_per_s"]
        assert row["ratio"] == pytest.approx(result["one_step"]["load"]["images_per_s"] / load["images_per_s"])
    assert "| teacher steps |" in steps_table(result)

    with pytest.raises(ValueError, match="not a masked-diffusion"):
        run_steps(StepsBench(one_step=str(tiny_bundles["one-step"]), teacher=str(tiny_bundles["one-step"])), "")


def test_refine_burst_batched_against_serial(tiny_bundles):
    config = RefineBench(
        model=str(tiny_bundles["one-step"]), requests=4, tteo_steps=2, rounds=1, max_batch_size=4, **FAST
    )
    result = run_refine(config, "softdimo bench refine")
    cost = result["step_cost"]
    assert cost["tteo_steps"] == result["tteo_steps"] == 2
    # the step cost is measured offline on one image at the burst's steps, and the table shows it in ms
    assert cost["batch_size"] == 1
    assert f"| 2 | 1 | {cost['forward_s'] * 1000:.3g} |" in refine_table(result)
    for label, batch_size in (("batched", 4), ("serial", 1)):
        run = result["runs"][label]
        assert run["max_batch_size"] == batch_size
        _check_level(run, 4)
        assert run["requests"] == 4 and len(run["round_s"]) == 1  # one burst of exactly `requests`
    assert result["runs"]["serial"]["mean_batch_size"] == 1
    assert result["ratio"] == pytest.approx(
        result["runs"]["batched"]["images_per_s"] / result["runs"]["serial"]["images_per_s"]
    )
    assert "| server | images/s |" in refine_table(result)


def test_serve_compares_two_models_side_by_side_in_interleaved_rounds(tiny_bundles):
    config = ServeBench(
        model=(str(tiny_bundles["one-step"]), str(tiny_bundles["one-step-class"])),
        concurrency=(1, 2),
        max_batch_size=2,
        rounds=2,
        **{**FAST, "duration_s": 0.6},
    )
    result = run_serve(config, "softdimo bench serve")
    assert [(arm["label"], arm["name"]) for arm in result["arms"]] == [
        ("A", "tiny-one-step"),
        ("B", "tiny-one-step-class"),
    ]
    for level, concurrency in zip(result["comparison"], (1, 2), strict=True):
        a, b = level["rounds_measured"]["A"], level["rounds_measured"]["B"]
        assert len(a) == len(b) == 2
        for measured in a + b:
            _check_level(measured, concurrency)  # every round of both servers answered every request
        ratios = [y["images_per_s"] / x["images_per_s"] for x, y in zip(a, b)]
        assert level["ratio"] == pytest.approx(statistics.median(ratios)) and level["ratio_min"] == min(ratios)
    table = serve_table(result)
    assert "A: softdimo serving `tiny-one-step`" in table and "B: softdimo serving `tiny-one-step-class`" in table
    assert "| concurrency | A images/s | B images/s | B / A |" in table


def test_serve_measures_softdimo_against_litserve_serving_the_same_pipeline(tiny_bundles):
    from importlib.metadata import version

    config = ServeBench(
        model=str(tiny_bundles["one-step"]), concurrency=(2,), max_batch_size=2, rounds=2, peer="litserve", **FAST
    )
    result = run_serve(config, "softdimo bench serve --peer litserve")
    peer, ours = result["arms"]
    assert peer["server"] == f"LitServe {version('litserve')}" and "server" not in ours
    assert peer["name"] == ours["name"] == "tiny-one-step"
    (level,) = result["comparison"]
    for label in "AB":
        for measured in level["rounds_measured"][label]:
            assert (
                measured["ok"] == measured["requests"] == measured["images"] > 0
            )  # every request answered with its image
    for measured in level["rounds_measured"]["B"]:
        _check_level(measured, 2)  # softdimo's own split of the time and its batches, from its /metrics
    assert level["ratio"] > 0
    assert "A: LitServe" in serve_table(result)
    peer_processes = _processes_running("benchmarks.litserve_peer", str(tiny_bundles["one-step"]))
    assert not peer_processes, "the peer's worker processes outlived it"
    with pytest.raises(BenchError, match="one model"):
        ServeBench(model=(str(tiny_bundles["one-step"]),) * 2, peer="litserve", **FAST)


def test_two_runtime_settings_are_refused_where_nothing_is_compared(tiny_bundles):
    config = RefineBench(model=str(tiny_bundles["one-step"]), precision=("fp32", "bf16"), **FAST)
    with pytest.raises(BenchError, match="bench serve or bench offline"):
        run_refine(config, "")
