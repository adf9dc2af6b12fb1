"""A real redis-server on a free loopback port for the tests that share a job store, or a skip saying why not."""

import shutil
import subprocess
import time
from contextlib import contextmanager

import pytest

from benchmarks.running import HOST, free_port


@contextmanager
def redis_server(folder):
    """Yields the URL of a fresh redis-server (Debian's `redis-server`, which `make test` installs) kept in `folder`."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed (`make tools` installs Debian's as root): the Redis job store is untested"
        )
    pytest.importorskip("redis", reason="the redis client is not installed (pip install -e '.[test]')")
    import redis

    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://{HOST}:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield url
    finally:
        process.kill()
        process.wait()
