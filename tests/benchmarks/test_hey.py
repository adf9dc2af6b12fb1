"""hey as the benchmarks' load generator: its CSV read into the closed loop's summary, against a fixed sample and
against a real server on a tiny bundle for about a second."""

import asyncio

import httpx
import pytest
from conftest import metric

from benchmarks.hey import answered_within_s, parse_csv
from benchmarks.load import HEY, Load, Target, hey_results, run_load, summarize, target_for
from benchmarks.serve import ServeBench, run_serve, serve_table
from benchmarks.server_under_test import ServerSpec, model_cards, running_server
from softdimo.bench_run import BenchError

pytestmark = pytest.mark.usefixtures("one_thread")

# What `hey -o csv` writes (hey 0.1.4): four answers 200, one each of 429, 503 and 422, in the order they finished.
SAMPLE = """response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
0.0100,0.0004,0.0000,0.0001,0.0093,0.0002,200,0.0010
0.0300,0.0003,0.0000,0.0000,0.0295,0.0002,200,0.0012
0.0010,0.0000,0.0000,0.0000,0.0009,0.0001,429,0.0320
0.0200,0.0000,0.0000,0.0000,0.0198,0.0002,200,0.0115
0.0020,0.0000,0.0000,0.0000,0.0019,0.0001,503,0.0340
0.0400,0.0000,0.0000,0.0000,0.0397,0.0003,200,0.0330
0.0030,0.0000,0.0000,0.0000,0.0029,0.0001,422,0.0365
"""


def test_hey_csv_becomes_the_closed_loop_summary():
    answers = parse_csv(SAMPLE)
    assert [a.status for a in answers] == [200, 200, 429, 200, 503, 200, 422]
    assert answered_within_s(answers) == pytest.approx(0.0330 + 0.0400)  # the last answer, not the last sent
    target = Target(path="/generate", model="m", body={"model": "m", "n": 2, "prompt": "a red circle"})
    level = summarize(hey_results(answers, target), [answered_within_s(answers)], concurrency=2, batches=(0.0, 0.0))
    assert (level["requests"], level["ok"], level["images"]) == (7, 4, 8)
    assert (level["status_429"], level["status_5xx"], level["other_status"]) == (1, 1, 1)
    # the answers 200 took 10, 20, 30 and 40 ms; percentiles interpolate linearly between them
    assert level["latency_ms"] == pytest.approx({"p50": 25.0, "p95": 38.5, "p99": 39.7, "mean": 25.0})
    assert level["images_per_s"] == pytest.approx(8 / 0.073)
    assert level["queue_ms"] is None and level["compute_ms"] is None  # hey never sees the server's timing


def test_hey_output_without_its_columns_is_refused():
    with pytest.raises(BenchError, match="response-time, status-code"):
        parse_csv("offset,latency\n0.1,0.2\n")


def test_hey_against_a_real_server_counts_what_the_server_answered(tiny_bundles):
    spec = ServerSpec(weights=(str(tiny_bundles["one-step"]),), device="cpu", max_batch_size=2, mode="thread")
    with running_server(spec) as url:
        target = target_for(model_cards(url)["tiny-one-step"], "/generate")
        invalid = Target(path="/generate", model="tiny-one-step", body={"model": "tiny-one-step", "n": 1})  # no prompt

        def answered(status: str) -> float:
            text = httpx.get(f"{url}/metrics").text
            return metric(text, "softdimo_requests_total", endpoint="/generate", status=status)

        before = answered("200"), answered("422")
        load = Load(concurrency=2, duration_s=0.8, max_requests=1, generator=HEY)  # hey runs for the duration
        level = asyncio.run(run_load(url, target, load))
        refused = asyncio.run(
            run_load(url, invalid, Load(concurrency=2, duration_s=0.3, max_requests=1, generator=HEY))
        )
        after = answered("200"), answered("422")

    assert level["load_generator"] == "hey" and level["concurrency"] == 2
    assert level["ok"] == level["requests"] == after[0] - before[0] > 1  # every answer the server gave, in hey's CSV
    assert level["images"] == level["ok"] and level["status_429"] == level["status_5xx"] == level["other_status"] == 0
    assert level["errors"] is None  # hey does not list requests that got no answer
    assert 0 < level["latency_ms"]["p50"] <= level["latency_ms"]["p95"] <= level["latency_ms"]["p99"]
    assert 0.5 < level["elapsed_s"] < 5 and level["images_per_s"] == pytest.approx(level["images"] / level["elapsed_s"])
    assert level["batches"] >= 1 and 1 <= level["mean_batch_size"] <= 2  # from the server's /metrics, as for builtin
    assert all(stage["count"] == level["ok"] for stage in level["stages"].values())
    assert refused["other_status"] == refused["requests"] == after[1] - before[1] > 0 and refused["ok"] == 0


def test_serve_comparison_under_hey_says_so_in_its_table(tiny_bundles):
    config = ServeBench(
        model=(str(tiny_bundles["one-step"]), str(tiny_bundles["one-step-class"])),
        concurrency=(2,),
        max_batch_size=2,
        rounds=2,
        load_generator="hey",
        device="cpu",
        duration_s=0.6,
        warmup_s=0.1,
        repeats=1,
        server="thread",
    )
    result = run_serve(config, "softdimo bench serve --load-generator hey")
    (level,) = result["comparison"]
    for measured in level["rounds_measured"]["A"] + level["rounds_measured"]["B"]:
        assert measured["load_generator"] == "hey" and measured["ok"] == measured["requests"] > 0
    assert level["ratio"] > 0
    table = serve_table(result)
    assert "load: closed loop of `hey` (external)" in table
    assert table.count("| concurrency | parse ms | queue ms |") == 2  # each softdimo arm's stages, under hey too


def test_hey_missing_is_named_before_anything_starts(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no hey on the PATH
    with pytest.raises(BenchError, match="apt-get install hey"):
        ServeBench(model="unused", load_generator="hey")
    with pytest.raises(BenchError, match="--load-generator is one of builtin, hey"):
        ServeBench(model="unused", load_generator="wrk")
