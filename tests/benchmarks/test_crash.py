"""`softdimo crash` against the tiny one-step bundle: two `kill -9`s of a server running jobs, every job accepted
finished by the servers that came after, as the report says and as the job store holds them."""

import json
import sqlite3

import pytest

from benchmarks.cli import main

pytestmark = pytest.mark.slow  # three `softdimo serve` child processes, and seconds of TTEO each


def test_two_kills_of_a_busy_server_lose_no_job(tiny_bundles, tmp_path, capsys):
    store, out = tmp_path / "jobs.sqlite3", tmp_path / "crash.json"
    code = main(
        [
            "crash",
            "--weights",
            str(tiny_bundles["one-step"]),
            "--kills",
            "2",
            "--device",
            "cpu",
            "--job-db-path",
            str(store),
            "--refine-jobs",
            "1",
            "--generate-jobs",
            "1",
            "--images",
            "8",
            "--tteo-steps",
            "200",
            "--job-concurrency",
            "1",
            "--job-lease-s",
            "1",
            "--kill-delay-s",
            "0.2",
            "--json",
            str(out),
        ]
    )

    assert code == 0
    report = json.loads(out.read_text())
    assert report["kills"] == 2 and len(report["running_at_kill"]) == 2 and min(report["running_at_kill"]) >= 1
    assert report["job_max_attempts"] == 3
    assert report["jobs"] == {"accepted": 4, "succeeded": 4, "failed": 0, "cancelled": 0, "unfinished": 0, "errors": {}}
    assert report["lost"] == 0 and report["lost_jobs"] == []
    # The store agrees: every job there succeeded, and a kill cut short a run of at least one of them.
    with sqlite3.connect(store) as db:
        stored = db.execute("SELECT status, attempts FROM jobs").fetchall()
    assert sorted(status for status, _ in stored) == ["succeeded"] * 4
    assert report["rerun"] == sum(attempts > 1 for _, attempts in stored) >= 1
    assert report["most_runs"] == max(attempts for _, attempts in stored) <= report["job_max_attempts"]
    printed = capsys.readouterr().out
    assert "2 of 2 kill -9 done" in printed and "jobs lost: 0" in printed
