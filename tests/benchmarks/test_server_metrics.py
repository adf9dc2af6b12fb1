"""A load's batches and request stages, read from the server's own /metrics exposition before and after it."""

import asyncio

import httpx
import pytest

from benchmarks.server_metrics import batches, changes, server_counters, stage_summary, stages
from server.metrics import REQUEST_STAGES, Metrics


def _read(metrics: Metrics) -> dict:
    """server_counters against an exposition of `metrics`, as the server's /metrics would answer it."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=metrics.exposition()))

    async def read():
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            return await server_counters(client, endpoint="/generate", model="m")

    return asyncio.run(read())


def test_the_changes_across_a_load_give_its_batches_and_stages():
    metrics = Metrics()
    metrics.declare(["/generate", "/refine"], ["m", "other"])
    metrics.batch_size.labels("/generate", "m").observe(4)  # before the load: not counted
    metrics.request_stage.labels("/generate", "compute").observe(1.0)
    before = _read(metrics)
    for images in (2, 4):
        metrics.batch_size.labels("/generate", "m").observe(images)
    metrics.batch_size.labels("/generate", "other").observe(16)  # another model, another endpoint: not this load's
    metrics.request_stage.labels("/refine", "compute").observe(9.0)
    # 200 requests: compute took 1.5 ms for 100 of them, 4 ms for 90 and 8.5 ms for 10
    for seconds, requests in ((0.0015, 100), (0.004, 90), (0.0085, 10)):
        for _ in range(requests):
            metrics.request_stage.labels("/generate", "compute").observe(seconds)
    changed = changes(before, _read(metrics))

    assert batches(changed) == (6.0, 2.0)
    observed = stages(changed)
    assert observed["compute"]["count"] == 200 and observed["compute"]["sum_s"] == pytest.approx(0.595)
    assert observed["parse"]["count"] == 0 and observed["parse"]["sum_s"] == 0.0
    summary = stage_summary([observed])
    assert summary["compute"]["mean_ms"] == pytest.approx(2.975)
    # the 198th of 200 lies in the (5 ms, 10 ms] bucket, holding the 191st to 200th: 8/10 of the way through it
    assert summary["compute"]["p99_ms"] == pytest.approx(9.0)
    assert all(summary[stage] == {"mean_ms": None, "p99_ms": None} for stage in REQUEST_STAGES if stage != "compute")


def test_rounds_are_merged_and_a_tail_past_the_last_bucket_reads_as_its_bound():
    metrics = Metrics()
    metrics.request_stage.labels("/generate", "queue").observe(0.15)
    first = stages(changes({}, _read(metrics)))
    metrics.request_stage.labels("/generate", "queue").observe(1000.0)  # past the largest bucket, 300 s
    second = stages(changes(_read(Metrics()), _read(metrics)))  # a fresh server's zeros as `before`
    summary = stage_summary([first, second])
    assert summary["queue"]["mean_ms"] == pytest.approx((0.15 + 0.15 + 1000.0) / 3 * 1000)
    assert summary["queue"]["p99_ms"] == pytest.approx(300_000.0)
