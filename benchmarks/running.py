"""A softdimo server on a free loopback port, in a child process or in a thread of this one, stopped at the end:
the one way tests, benchmarks and the soak command start a server of their own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx

HOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    """The server exited, or did not answer /readyz with 200 in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until_ready(
    url: str,
    *,
    alive: Callable[[], bool],
    timeout_s: float,
    describe: Callable[[], str] = str,
    path: str = "/readyz",
) -> None:
    """Poll `path` until it answers 200; ServerStartError when the server dies, reports a failed load, or time runs
    out. `describe` adds what the server printed to the error."""
    deadline = time.monotonic() + timeout_s
    status = "no answer"
    with httpx.Client(base_url=url, timeout=2, trust_env=False) as client:
        while alive() and time.monotonic() < deadline:
            try:
                response = client.get(path)
                if response.status_code == 200:
                    return
                is_json = response.headers.get("content-type", "").startswith("application/json")
                status = response.json().get("status", response.text) if is_json else response.text[:200]
                if status.startswith("failed"):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    gone = "" if alive() else " (it exited)"
    raise ServerStartError(f"the server at {url} did not become ready{gone}: {status}\n{describe()}".rstrip())


@contextmanager
def server_thread(settings, engine=None, ready_timeout_s: float = 60.0) -> Iterator[str]:
    """`create_app(settings, engine)` under uvicorn in a thread of this process; yields its URL once ready.

    Quick to start, but it shares the GIL with the caller. With `engine`, the app serves those models instead of
    loading `settings.weights`."""
    import uvicorn

    from server.app import create_app

    port = free_port()
    settings = settings.model_copy(update={"host": HOST, "port": port})
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, engine), host=HOST, port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True, name="softdimo-server")
    thread.start()
    url = f"http://{HOST}:{port}"
    try:
        wait_until_ready(url, alive=thread.is_alive, timeout_s=ready_timeout_s)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@contextmanager
def server_process(
    args: list[str],
    *,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 90.0,
    graceful_stop: bool = False,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`softdimo serve ARGS --host 127.0.0.1 --port FREE` as a child process; yields (process, URL) once ready.

    Its output goes to `log_path` (a temporary file when None). `env` is the whole environment when given. At the
    end a process still running is stopped: with SIGTERM and a wait for its drain when `graceful_stop`, else killed."""
    command = lambda port: [sys.executable, "-m", "server.cli", "serve", *args, "--host", HOST, "--port", str(port)]  # noqa: E731
    with child_server(
        command, log_path=log_path, env=env, ready_timeout_s=ready_timeout_s, graceful_stop=graceful_stop
    ) as started:
        yield started


@contextmanager
def child_server(
    command: Callable[[int], list[str]],
    *,
    ready_path: str = "/readyz",
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 90.0,
    graceful_stop: bool = False,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Any HTTP server as a child process: `command(port)` on a free loopback port, ready when `ready_path` answers
    200; yields (process, URL), and stops it at the end as server_process does."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    with open(log_path, "w+b") if log_path is not None else tempfile.TemporaryFile() as log:

        def printed() -> str:
            log.flush()
            log.seek(0)
            return log.read().decode(errors="replace")[-3000:]

        # A session of its own: the server's own children (a peer's worker processes) are stopped with it.
        environment = os.environ.copy() if env is None else env
        process = subprocess.Popen(
            command(port), stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
        try:
            wait_until_ready(
                url, alive=lambda: process.poll() is None, timeout_s=ready_timeout_s, describe=printed, path=ready_path
            )
            yield process, url
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if graceful_stop else signal.SIGKILL)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            _stop_group(process.pid)


def _stop_group(group: int) -> None:
    """Kill what is left of a stopped server's process group (children it started and did not stop)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
