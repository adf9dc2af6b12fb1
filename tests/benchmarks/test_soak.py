"""`softdimo soak` against a live tiny server: mixed traffic, a report of statuses, latencies and memory, no 5xx;
with jobs in the mix, every job it submitted accounted for."""

import json

import httpx
from benchmarks.running import server_thread

from conftest import metric
from server.settings import Settings
from benchmarks.cli import main


def _soak(url: str, out, *more: str) -> int:
    """`softdimo soak` for three seconds at concurrency 3 (seed 1) against `url`, writing its JSON to `out`."""
    args = ["soak", "--url", url, "--minutes", str(3 / 60), "--concurrency", "3", "--seed", "1", *more]
    return main([*args, "--json", str(out)])


def test_soak_sends_mixed_traffic_and_reports_it(tiny_bundles, tmp_path, capsys):
    weights = [str(tiny_bundles[name]) for name in ("one-step", "class")]
    out = tmp_path / "soak.json"
    with server_thread(Settings(weights=weights, device="cpu", max_batch_size=2, max_wait_ms=2)) as url:
        code = _soak(url, out, "--job-share", "0")
        assert httpx.get(f"{url}/readyz").status_code == 200

    assert code == 0
    report = json.loads(out.read_text())
    assert report["models"] == ["tiny-one-step", "tiny-class"]
    assert report["server_errors"] == 0 and report["errors"] == {}
    assert report["by_status"].get("200", 0) >= 2 and report["requests"] == sum(report["by_status"].values())
    # Traffic is mixed (each worker's first pick is fixed by the seed: one /refine, two /generate), and /refine goes
    # only to the model whose card lists a reward: the class teacher would answer it with 422.
    assert set(report["by_endpoint"]) == {"/generate", "/refine"} and set(report["by_status"]) <= {"200", "429"}
    latency = report["latency_ms"]["/generate"]
    assert set(latency) == {"p50", "p95", "p99", "mean"} and 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert report["rss_start_bytes"] > 10 * 2**20 and report["rss_end_bytes"] > 10 * 2**20
    assert report["rss_growth_bytes"] == report["rss_end_bytes"] - report["rss_start_bytes"]
    printed = capsys.readouterr().out
    assert "status: 200 x" in printed and "server errors (5xx): 0" in printed and "server resident memory:" in printed


def test_soak_with_jobs_accounts_for_every_job_the_server_accepted(tiny_bundles, tmp_path, capsys):
    weights = [str(tiny_bundles[name]) for name in ("one-step", "class")]
    out = tmp_path / "soak.json"
    settings = Settings(
        weights=weights, device="cpu", max_batch_size=2, max_wait_ms=2, job_db_path=str(tmp_path / "jobs.sqlite3")
    )
    with server_thread(settings) as url:
        code = _soak(url, out, "--job-share", "0.5", "--drain-s", "60")
        metrics = httpx.get(f"{url}/metrics").text

    assert code == 0
    report = json.loads(out.read_text())
    jobs = report["jobs"]
    endpoints = ("generate", "refine")
    # The server's own counts: every job it stored was seen accepted, and every one it ran to success seen succeeded.
    assert jobs["accepted"] == sum(metric(metrics, "softdimo_jobs_submitted_total", endpoint=e) for e in endpoints)
    assert jobs["succeeded"] == sum(
        metric(metrics, "softdimo_jobs_total", endpoint=e, status="succeeded") for e in endpoints
    )
    assert jobs["accepted"] >= 2 and jobs["accepted"] == report["by_endpoint"]["/v1/jobs"]["202"]
    assert jobs == {
        "accepted": jobs["accepted"],
        "succeeded": jobs["accepted"],
        "failed": 0,
        "cancelled": 0,
        "unfinished": 0,
        "errors": {},
    }
    assert report["unfinished_jobs"] == [] and report["server_errors"] == 0
    assert {"/generate", "/refine"} <= set(report["by_endpoint"])  # synchronous traffic too
    printed = capsys.readouterr().out
    assert f"jobs (50% of requests, /v1/jobs): {jobs['accepted']} accepted; {jobs['accepted']} succeeded" in printed
