"""The softdimo server a benchmark measures: its spec, started on a free port and stopped, and the models it serves."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from benchmarks.running import ServerStartError, server_process, server_thread
from server.settings import Settings
from softdimo.bench_run import BenchError
from softdimo.runtime import RuntimeSettings


@dataclass(frozen=True)
class ServerSpec:
    weights: tuple[str, ...]
    device: str
    max_batch_size: int
    max_wait_ms: float | None = None  # None: the server's default
    mode: str = "process"  # "process": `softdimo serve` in a child process; "thread": uvicorn in a thread here
    runtime: RuntimeSettings = RuntimeSettings()  # precision, compiled buckets, pinned copies
    refine_chunk: int | None = None  # images per piece of background TTEO work; None: the server's default


@contextmanager
def running_server(spec: ServerSpec, ready_timeout_s: float = 300.0) -> Iterator[str]:
    """Start a server for `spec` on a free loopback port, wait until it is ready, yield its URL, stop it.

    "process" runs `softdimo serve` in a child process, so the server's event loop never shares a GIL with the
    load generator; "thread" runs uvicorn in a thread here, quicker to start."""
    if spec.mode not in ("process", "thread"):
        raise BenchError(f"unknown server mode {spec.mode!r}; use process or thread")
    flags = {"max_wait_ms": spec.max_wait_ms} if spec.max_wait_ms is not None else {}
    if spec.refine_chunk is not None:
        flags["refine_chunk"] = spec.refine_chunk
    jobs = tempfile.TemporaryDirectory(prefix="softdimo-bench-jobs-")  # a job store of its own, left nowhere
    settings = Settings(
        weights=list(spec.weights),
        device=spec.device,
        max_batch_size=spec.max_batch_size,
        api_key=None,
        log_level="warning",
        job_db_path=str(Path(jobs.name) / "jobs.sqlite3"),
        **flags,
        **spec.runtime.to_dict(),
    )
    try:
        if spec.mode == "thread":
            with server_thread(settings, ready_timeout_s=ready_timeout_s) as url:
                yield url
            return
        # SOFTDIMO_* settings of the calling shell (an API key, a smaller queue) would change what is measured.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTDIMO_")}
        with server_process(
            serve_arguments(settings), env=env, ready_timeout_s=ready_timeout_s, graceful_stop=True
        ) as (_, url):
            yield url
    except ServerStartError as exc:
        raise BenchError(str(exc)) from exc
    finally:
        jobs.cleanup()


def serve_arguments(settings: Settings) -> list[str]:
    """The `softdimo serve` flags that reproduce `settings`' weights, device, batching and runtime."""
    runtime = settings.runtime()
    return [
        "--weights",
        *settings.weights,
        "--device",
        settings.device,
        "--max-batch-size",
        str(settings.max_batch_size),
        "--max-wait-ms",
        str(settings.max_wait_ms),
        "--log-level",
        settings.log_level,
        "--precision",
        runtime.precision,
        "--compile" if runtime.compile else "--no-compile",
        "--pin-memory" if runtime.pin_memory else "--no-pin-memory",
        "--job-db-path",
        settings.job_db_path,
        *(["--refine-chunk", str(settings.refine_chunk)] if settings.refine_chunk is not None else []),
    ]


def model_cards(url: str) -> dict[str, dict]:
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        return {card["name"]: card for card in client.get("/v1/models").json()["data"]}
