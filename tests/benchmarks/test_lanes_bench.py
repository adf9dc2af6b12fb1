"""`softdimo bench lanes` on a tiny model: /generate alone and under /refine jobs, both answered in full, and under
jobs a /generate waits for a piece of TTEO work, never for a whole job's batch."""

import pytest

from benchmarks.lanes import LanesBench, lanes_table, run_lanes
from softdimo.bench_run import BenchError


def test_generate_latency_alone_and_under_jobs(tiny_bundles):
    config = LanesBench(
        model=str(tiny_bundles["one-step"]),
        device="cpu",
        server="thread",
        duration_s=4.0,
        warmup_s=0.2,
        max_batch_size=8,
        concurrency=2,
        jobs=2,
        job_images=8,
        tteo_steps=10,  # a job finishes within the run, though interactive calls go between its every piece
    )
    result = run_lanes(config, "softdimo bench lanes")
    for run in (result["alone"], result["under_jobs"]):
        assert run["ok"] == run["requests"] > 0 and run["status_5xx"] == run["errors"] == 0
    jobs = result["jobs"]
    assert jobs["succeeded"] >= 1 and jobs["failed"] == 0
    under, alone = result["under_jobs"]["latency_ms"]["p99"], result["alone"]["latency_ms"]["p99"]
    assert result["p99_ratio"] == pytest.approx(under / alone)
    assert under < 0.5 * jobs["mean_compute_s"] * 1000, (
        under,
        jobs,
    )  # interactive work goes between pieces of TTEO work
    assert f"{under:.1f}" in lanes_table(result) and "p99 under jobs / alone" in lanes_table(result)


def test_a_model_without_a_reward_is_refused(tiny_bundles):
    config = LanesBench(model=str(tiny_bundles["text"]), device="cpu", server="thread", duration_s=0.5, warmup_s=0)
    with pytest.raises(BenchError, match="no reward"):
        run_lanes(config, "")
