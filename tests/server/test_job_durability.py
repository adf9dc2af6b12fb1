"""Nothing accepted is lost: jobs survive `kill -9` and SIGTERM of the `softdimo serve` process that accepted them
and are run by the next one with their seeds (the same images), and replicas sharing a Redis server answer for
each other's jobs."""

import signal
import time

import httpx
import pytest
from redis_server import redis_server
from benchmarks.running import server_process, server_thread

from server.job_store import SQLiteJobStore
from server.settings import Settings

pytestmark = pytest.mark.slow  # three servers in child processes, and seconds of TTEO each

PROMPT = "a red circle"
LONG = {"endpoint": "refine", "prompt": PROMPT, "n": 8, "steps": 200, "seed": 7}


def _args(bundles, store, *more: str) -> list[str]:
    return [
        "--weights",
        str(bundles["one-step"]),
        "--device",
        "cpu",
        "--max-batch-size",
        "8",
        "--job-db-path",
        str(store),
        "--job-concurrency",
        "1",
        "--job-lease-s",
        "1",
        *more,
    ]


def _submit(url: str, body: dict) -> str:
    answer = httpx.post(f"{url}/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def _wait(url: str, job_id: str, until, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while not until(job := httpx.get(f"{url}/v1/jobs/{job_id}").json()):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def _finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def _synchronous(url: str, body: dict) -> list[dict]:
    endpoint = body["endpoint"]
    return httpx.post(f"{url}/{endpoint}", json={k: v for k, v in body.items() if k != "endpoint"}, timeout=120).json()[
        "data"
    ]


def test_jobs_accepted_before_kill_9_are_run_after_the_restart_with_the_same_images(tiny_bundles, tmp_path):
    store = tmp_path / "jobs.sqlite3"
    bodies = [
        LONG,
        {"endpoint": "generate", "prompt": "two blue squares", "n": 3},
        {"endpoint": "refine", "prompt": PROMPT, "steps": 3},
    ]
    with server_process(_args(tiny_bundles, store)) as (process, url):
        ids = [_submit(url, body) for body in bodies]
        _wait(url, ids[0], lambda job: job["progress"] is not None)  # mid-way through its TTEO steps
        process.kill()
        process.wait(timeout=30)
    with server_process(_args(tiny_bundles, store)) as (_, url):
        jobs = [_wait(url, job_id, _finished) for job_id in ids]
        assert [job["status"] for job in jobs] == ["succeeded"] * 3, jobs
        seeds = [job["result"]["data"][0]["seed"] for job in jobs]
        for body, job, seed in zip(bodies, jobs, seeds):  # the seeds drawn at submit, before the crash
            assert job["result"]["data"] == _synchronous(url, {**body, "seed": seed})


def test_sigterm_finishes_the_running_job_and_leaves_queued_ones_for_the_next_process(tiny_bundles, tmp_path):
    store = tmp_path / "jobs.sqlite3"
    bodies = [
        {**LONG, "steps": 60},
        {**LONG, "seed": 8, "steps": 5},
        {"endpoint": "generate", "prompt": PROMPT, "seed": 3},
    ]
    with server_process(_args(tiny_bundles, store, "--drain-timeout-s", "120")) as (process, url):
        ids = [_submit(url, body) for body in bodies]
        _wait(url, ids[0], lambda job: job["status"] == "running")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    stored = SQLiteJobStore(store)
    assert [stored.get(job_id).status for job_id in ids] == ["succeeded", "queued", "queued"]
    stored.close()
    with server_process(_args(tiny_bundles, store)) as (_, url):
        jobs = [_wait(url, job_id, _finished) for job_id in ids]
        assert all(job["result"]["data"] == _synchronous(url, body) for job, body in zip(jobs, bodies))


def test_replicas_sharing_redis_answer_and_cancel_each_others_jobs(tiny_bundles, tmp_path):
    with redis_server(tmp_path) as redis_url:
        settings = Settings(
            weights=[str(tiny_bundles["one-step"])],
            device="cpu",
            max_batch_size=8,
            job_store="redis",
            redis_url=redis_url,
            job_concurrency=1,
            job_lease_s=0.6,
        )
        with server_thread(settings) as first, server_thread(settings) as second:
            body = {"endpoint": "refine", "prompt": PROMPT, "seed": 5, "steps": 4}
            job_id = _submit(first, body)
            job = _wait(second, job_id, _finished)
            assert job["status"] == "succeeded" and job["result"]["data"] == _synchronous(first, body)
            long_id = _submit(second, LONG)
            _wait(first, long_id, lambda job: job["progress"] is not None)
            assert httpx.delete(f"{first}/v1/jobs/{long_id}").json()["status"] == "cancelled"
            # Whichever replica runs it hears of the cancellation from its store within a lease renewal.
            quick = _submit(first, {"endpoint": "generate", "prompt": PROMPT})
            quick2 = _submit(second, {"endpoint": "generate", "prompt": PROMPT})
            assert _wait(second, quick, _finished, timeout_s=20)["status"] == "succeeded"
            assert _wait(first, quick2, _finished, timeout_s=20)["status"] == "succeeded"
            stopped = httpx.get(f"{second}/v1/jobs/{long_id}").json()
            assert stopped["status"] == "cancelled" and stopped["progress"]["step"] < LONG["steps"]


def test_an_unreachable_job_store_keeps_the_server_unready_saying_why(tiny_bundles):
    from benchmarks.running import ServerStartError, free_port

    settings = Settings(
        weights=[str(tiny_bundles["one-step"])],
        device="cpu",
        max_batch_size=2,
        job_store="redis",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    with pytest.raises(ServerStartError, match="failed: job store: ConnectionError"):
        with server_thread(settings, ready_timeout_s=30):
            pass
