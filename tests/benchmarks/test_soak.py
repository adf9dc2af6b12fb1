"""`softdimo soak` against a live tiny server: mixed traffic, a report of statuses, latencies and memory, no 5xx."""

import json

import httpx
from benchmarks.running import server_thread

from server.settings import Settings
from benchmarks.cli import main


def test_soak_sends_mixed_traffic_and_reports_it(tiny_bundles, tmp_path, capsys):
    weights = [str(tiny_bundles[name]) for name in ("one-step", "class")]
    out = tmp_path / "soak.json"
    with server_thread(Settings(weights=weights, device="cpu", max_batch_size=2, max_wait_ms=2)) as url:
        code = main(
            ["soak", "--url", url, "--minutes", str(3 / 60), "--concurrency", "3", "--seed", "1", "--json", str(out)]
        )
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
