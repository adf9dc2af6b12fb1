"""`deploy/lint.py scrape` holds an exposition to the metrics contract, jobs' own label values included: a job's
endpoint is its kind (generate, refine) and its status a job status, not an HTTP path and code."""

import subprocess
import sys
from pathlib import Path

from server.metrics import Metrics

LINT = Path(__file__).resolve().parents[2] / "deploy" / "lint.py"


def scrape(tmp_path: Path, metrics: Metrics) -> subprocess.CompletedProcess:
    exposition = tmp_path / "metrics.txt"
    exposition.write_bytes(metrics.exposition())
    return subprocess.run([sys.executable, str(LINT), "scrape", str(exposition)], capture_output=True, text=True)


def test_a_server_that_ran_jobs_meets_the_contract(tmp_path):
    metrics = Metrics()
    metrics.declare(["/generate", "/refine"], ["m"])
    metrics.requests.labels("/refine", "m", "202").inc()
    metrics.jobs_submitted.labels("refine").inc()
    metrics.jobs.labels("refine", "succeeded").inc()
    metrics.jobs.labels("generate", "cancelled").inc()
    metrics.jobs_queued.set(3)
    out = scrape(tmp_path, metrics)
    assert out.returncode == 0, out.stdout + out.stderr


def test_job_series_labelled_like_requests_break_the_contract(tmp_path):
    metrics = Metrics()
    metrics.jobs.labels("/refine", "200").inc()
    out = scrape(tmp_path, metrics)
    assert out.returncode == 1
    assert "softdimo_jobs_total: endpoint='/refine'" in out.stdout
    assert "softdimo_jobs_total: status='200'" in out.stdout
