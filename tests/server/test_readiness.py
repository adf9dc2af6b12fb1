"""Readiness: 503 until every model is loaded and warmed, with the reason; liveness answers throughout."""

import asyncio
import threading

import httpx
from benchmarks.running import free_port
import uvicorn

from server.app import create_app
from server.settings import Settings


def test_unloadable_weights_keep_the_server_alive_but_unready(tmp_path):
    missing = tmp_path / "no-such-bundle"
    port = free_port()
    app = create_app(Settings(weights=[str(missing)], device="cpu", port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    ready = None
    try:
        for _ in range(200):
            try:
                ready = httpx.get(f"{url}/readyz")
                if "failed" in ready.text:
                    break
            except httpx.TransportError:
                pass
            asyncio.run(asyncio.sleep(0.05))
        assert ready is not None, "the server never answered /readyz"
        assert ready.status_code == 503 and "no such bundle folder" in ready.json()["status"]
        assert httpx.get(f"{url}/healthz").status_code == 200
        refused = httpx.post(f"{url}/generate", json={"prompt": "a red circle"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert httpx.get(f"{url}/v1/models").json() == {"data": []}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
