"""A real Prometheus on loopback scrapes a real server with the project's own rule files loaded."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from benchmarks.running import free_port, server_thread
from tiny_bundles import write_all

from server.settings import Settings

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"
pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="needs the prometheus binary (Debian package prometheus)"
)


def _query(prom: str, expr: str) -> list:
    body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait_for(prom: str, expr: str, timeout_s: float = 40.0) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = _query(prom, expr)
        except (httpx.TransportError, ValueError):  # Prometheus is still starting (refused, or "not ready" text)
            result = []
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no data for {expr!r} within {timeout_s}s")


def test_scrape_counters_and_recording_rules(tmp_path):
    bundles = write_all(tmp_path / "bundles")
    settings = Settings(weights=[str(bundles["one-step"])], device="cpu", max_batch_size=4)
    with server_thread(settings) as url:
        config = yaml.safe_load((RULES.parent / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(RULES / "recording.yml"), str(RULES / "alerts.yml")]
        config["scrape_configs"][0]["static_configs"][0]["targets"] = [url.removeprefix("http://")]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        prom = f"http://127.0.0.1:{port}"
        try:
            up = _wait_for(prom, 'up{job="softdimo"} == 1')
            assert up[0]["metric"]["instance"] == url.removeprefix("http://")
            for i in range(30):  # traffic spread over a few scrapes, so rates and quantiles have two samples
                httpx.post(f"{url}/generate", json={"prompt": "a red circle", "n": 2, "seed": i})
                if i % 10 == 0:
                    httpx.post(f"{url}/refine", json={"prompt": "a red circle", "seed": i, "steps": 1})
                httpx.post(f"{url}/generate", json={"prompt": "a purple circle"})  # a 422
                time.sleep(0.2)
            moved = _wait_for(prom, 'softdimo_requests_total{endpoint="/generate",status="200"} >= 30')
            assert float(moved[0]["value"][1]) >= 30
            assert _wait_for(prom, 'softdimo_images_generated_total{endpoint="/generate"} >= 60')
            for rule in [
                'endpoint:softdimo_request_duration_seconds:p99_5m{endpoint="/generate"}',
                'endpoint:softdimo_images_generated:rate5m{endpoint="/generate"} > 0',
                'endpoint_model:softdimo_batch_size:mean_5m{endpoint="/generate"} >= 1',
                'endpoint:softdimo_requests:rate5m{endpoint="/generate"} > 0',
                "model:softdimo_tteo_steps:rate5m > 0",
            ]:
                assert _wait_for(prom, rule), rule
            firing = _query(prom, 'ALERTS{alertname="SoftdimoTargetDown"}')
            assert firing == []
            # The server's own exposition against the contract deploy/lint.py reads from server/metrics.py.
            lint = subprocess.run(
                [sys.executable, str(RULES.parents[1] / "lint.py"), "scrape", f"{url}/metrics"],
                capture_output=True,
                text=True,
            )
            assert lint.returncode == 0, lint.stdout + lint.stderr
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=10)
