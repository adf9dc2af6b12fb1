"""A real uvicorn server on a free loopback port, run in a thread for the duration of a test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from server.app import create_app
from server.engine import Engine
from server.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, *, alive, timeout_s: float) -> bool:
    """Poll /readyz until it answers 200 (True), or the server dies or the time runs out (False)."""
    deadline = time.monotonic() + timeout_s
    while alive() and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


@contextmanager
def live_server(settings: Settings, ready_timeout_s: float = 60.0, engine: Engine | None = None):
    """Start the app on a real socket, wait for /readyz, yield its base URL, then shut it down.

    With `engine`, the app serves those models (e.g. ones made to fail on purpose) instead of loading `settings.weights`."""
    port = free_port()
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
    app = create_app(settings, engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ready(url, alive=thread.is_alive, timeout_s=ready_timeout_s):
        server.should_exit = True
        raise RuntimeError(f"server at {url} did not become ready")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def server_process(args: list[str], log_path: Path, ready_timeout_s: float = 90.0, env: dict[str, str] | None = None):
    """Run `softdimo serve <args> --port <free>` as a child process; yield (process, base URL) once /readyz is 200.

    Its output goes to `log_path`; the process is killed at the end if it is still running."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            if not wait_until_ready(url, alive=lambda: process.poll() is None, timeout_s=ready_timeout_s):
                raise RuntimeError(f"server at {url} did not become ready:\n{log_path.read_text()[-3000:]}")
            yield process, url
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
