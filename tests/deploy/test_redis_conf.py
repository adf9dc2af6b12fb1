"""The redis.conf that components/redis ships runs on a real redis-server and keeps an accepted job through a
kill -9 of Redis: the job is in the store, still queued, when Redis comes back on the same data folder."""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.running import HOST, free_port
from server.job_store import QUEUED, JobRecord, RedisJobStore

REDIS_CONF = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "components" / "redis" / "redis.conf"


def start_redis(data: Path, port: int) -> subprocess.Popen:
    """redis-server with the shipped config; only where it listens and keeps its files differ from the pod's."""
    import redis

    process = subprocess.Popen(
        ["redis-server", str(REDIS_CONF), "--port", str(port), "--bind", HOST, "--dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            if redis.Redis(host=HOST, port=port).ping():
                return process
        except (redis.ConnectionError, redis.BusyLoadingError):
            if process.poll() is not None:
                raise AssertionError(f"redis-server refused the config: {process.stdout.read()}") from None
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server (Debian package redis-server)")
def test_an_accepted_job_survives_a_kill_9_of_redis(tmp_path):
    pytest.importorskip("redis", reason="the redis client is not installed (pip install -e '.[test]')")
    port = free_port()
    url = f"redis://{HOST}:{port}/0"
    redis_process = start_redis(tmp_path, port)
    try:
        store = RedisJobStore(url)
        job = JobRecord(id="job-1", endpoint="refine", body={"prompt": "a red circle", "seed": 7}, created=time.time())
        assert store.add(job, max_queued_per_owner=None)
        store.close()
        redis_process.kill()  # SIGKILL: no shutdown save, only what the append-only file already holds
        redis_process.wait()
        redis_process = start_redis(tmp_path, port)
        store = RedisJobStore(url)
        kept = store.get("job-1")
        assert kept is not None and kept.status == QUEUED and kept.body["seed"] == 7
        assert store.count_all_queued() == 1
        assert store.claim(worker="w", lease_s=30).id == "job-1"
        store.close()
    finally:
        redis_process.kill()
        redis_process.wait()
