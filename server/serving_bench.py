"""Benchmarks through the HTTP server: a closed-loop load generator, and the serve, steps and refine suites."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import sys
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.load_client import Connection, LoadClientError
from server.running import ServerStartError, child_server, server_process, server_thread
from server.settings import Settings
from softdimo.device import resolve_device
from softdimo.bench import refine_call, tteo_step_cost
from softdimo.bench_run import (
    DEFAULT_BATCH_SIZES,
    BenchError,
    RuntimeOptions,
    check_options,
    machine_header,
    machine_info,
    runtime_words,
)
from softdimo.tables import markdown_table
from softdimo.timing import WARMUP_CALLS, compare_rounds, interleaved, latency_summary, median_seconds, ratio, ratio_range
from softdimo.warmup import EXAMPLE_PROMPT, example_inputs
from softdimo.bundle import read_bundle
from softdimo.pipeline import load_pipeline
from softdimo.runtime import Runtime, RuntimeSettings

LATENCY_TARGET_MS = 5.0  # p50 at concurrency 1 may exceed the offline forward time by at most this


# ---------------------------------------------------------------- the server under test


@dataclass(frozen=True)
class ServerSpec:
    weights: tuple[str, ...]
    device: str
    max_batch_size: int
    max_wait_ms: float | None = None  # None: the server's default
    mode: str = "process"  # "process": `softdimo serve` in a child process; "thread": uvicorn in a thread here
    runtime: RuntimeSettings = RuntimeSettings()  # precision, compiled buckets, pinned copies


@contextmanager
def running_server(spec: ServerSpec, ready_timeout_s: float = 300.0) -> Iterator[str]:
    """Start a server for `spec` on a free loopback port, wait until it is ready, yield its URL, stop it.

    "process" runs `softdimo serve` in a child process, so the server's event loop never shares a GIL with the
    load generator; "thread" runs uvicorn in a thread here, quicker to start."""
    if spec.mode not in ("process", "thread"):
        raise BenchError(f"unknown server mode {spec.mode!r}; use process or thread")
    flags = {"max_wait_ms": spec.max_wait_ms} if spec.max_wait_ms is not None else {}
    settings = Settings(
        weights=list(spec.weights), device=spec.device, max_batch_size=spec.max_batch_size, api_key=None,
        log_level="warning", **flags, **spec.runtime.to_dict(),
    )  # fmt: skip
    try:
        if spec.mode == "thread":
            with server_thread(settings, ready_timeout_s=ready_timeout_s) as url:
                yield url
            return
        # SOFTDIMO_* settings of the calling shell (an API key, a smaller queue) would change what is measured.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTDIMO_")}
        with server_process(serve_arguments(settings), env=env, ready_timeout_s=ready_timeout_s, graceful_stop=True) as (_, url):
            yield url
    except ServerStartError as exc:
        raise BenchError(str(exc)) from exc


def serve_arguments(settings: Settings) -> list[str]:
    """The `softdimo serve` flags that reproduce `settings`' weights, device, batching and runtime."""
    runtime = settings.runtime()
    return [
        "--weights", *settings.weights, "--device", settings.device, "--max-batch-size", str(settings.max_batch_size),
        "--max-wait-ms", str(settings.max_wait_ms), "--log-level", settings.log_level, "--precision", runtime.precision,
        "--compile" if runtime.compile else "--no-compile", "--pin-memory" if runtime.pin_memory else "--no-pin-memory",
    ]  # fmt: skip


def model_cards(url: str) -> dict[str, dict]:
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        return {card["name"]: card for card in client.get("/v1/models").json()["data"]}


# ---------------------------------------------------------------- the load generator


@dataclass(frozen=True)
class Target:
    """What every request asks: an endpoint, a model and a body; each request gets a seed of its own."""

    path: str  # "/generate" or "/refine"
    model: str
    body: dict

    def request(self, index: int) -> dict:
        return {**self.body, "seed": index}


def target_for(card: dict, path: str, steps: int | None = None) -> Target:
    """One image per request, with the fixed example prompt (or class 0); cost does not depend on content."""
    body = {"model": card["name"], "n": 1}
    body.update({"prompt": EXAMPLE_PROMPT} if card["conditioning"] == "text" else {"class_label": 0})
    if steps is not None:
        body["steps"] = steps
    return Target(path=path, model=card["name"], body=body)


@dataclass
class RequestResult:
    latency_s: float  # client-side, send to full body received
    status: int  # HTTP status; 0 when the request failed without one (connection error, client timeout)
    images: int = 0
    queue_s: float | None = None  # the server's own split, from the response's `timing`
    compute_s: float | None = None
    path: str = ""  # the endpoint asked
    error: str | None = None  # why there is no status: the exception's type


@dataclass(frozen=True)
class Load:
    """A closed loop: `concurrency` workers each send a request and wait for its answer before the next.

    A round stops issuing requests after `duration_s` or `max_requests`, whichever comes first, and ends when
    the requests in flight are answered (each bounded by `timeout_s`). Warm-up rounds run first and are dropped."""

    concurrency: int
    duration_s: float
    max_requests: int
    warmup_s: float = 0.0  # one warm-up round of this length (same concurrency and request bound); 0: none
    rounds: int = 1
    timeout_s: float = 120.0


Requests = Callable[[int], Callable[[], tuple[str, dict]]]  # worker index -> that worker's next (path, body)


async def closed_loop(
    url: str, requests: Requests, *, concurrency: int, duration_s: float, max_requests: int, timeout_s: float,
    headers: dict[str, str] | None = None, backoff_max_s: float = 0.0,
) -> tuple[list[RequestResult], float]:  # fmt: skip
    """One round of `concurrency` workers, each sending its next request and waiting for the answer; returns every
    request's result and the round's wall time. Each worker keeps its own connection. With `backoff_max_s`, a worker
    answered 429 or 503 pauses for Retry-After (1 s without one), at most that long, as a polite client would."""
    began = time.perf_counter()
    deadline = began + duration_s
    issued = itertools.count()
    results: list[RequestResult] = []

    async def worker(index: int) -> None:
        connection = Connection(url, headers)
        next_request = requests(index)
        try:
            while time.perf_counter() < deadline and next(issued) < max_requests:
                path, body = next_request()
                sent = time.perf_counter()
                try:
                    status, content = await connection.post_json(path, body, timeout_s=timeout_s)
                    result = RequestResult(time.perf_counter() - sent, status, path=path)
                    if status == 200:
                        payload = json.loads(content)
                        result.images = len(payload["data"])
                        if "timing" in payload:  # a peer server answers without the contract's timing
                            result.queue_s, result.compute_s = payload["timing"]["queue_s"], payload["timing"]["compute_s"]
                except (LoadClientError, TimeoutError, ValueError, KeyError) as exc:  # no answer, or a 200 without the contract's body
                    result = RequestResult(time.perf_counter() - sent, 0, path=path, error=type(exc).__name__)
                results.append(result)
                if backoff_max_s and result.status in (429, 503):
                    pause = connection.retry_after if connection.retry_after is not None else 1.0
                    await asyncio.sleep(min(pause, backoff_max_s, max(0.0, deadline - time.perf_counter())))
        finally:
            connection.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return results, time.perf_counter() - began


def fixed_requests(target: Target, seeds: Iterator[int]) -> Requests:
    """Every worker sends the target's request, each with the next seed."""
    return lambda worker: lambda: (target.path, target.request(next(seeds)))


async def batch_counters(client: httpx.AsyncClient, target: Target) -> tuple[float, float]:
    """(sum, count) of the server's softdimo_batch_size histogram for the target's endpoint and model."""
    text = (await client.get("/metrics")).text
    found = {"softdimo_batch_size_sum": 0.0, "softdimo_batch_size_count": 0.0}
    wanted = {"endpoint": target.path, "model": target.model}
    for family in text_string_to_metric_families(text):
        if family.name != "softdimo_batch_size":
            continue
        for sample in family.samples:
            if sample.name in found and all(sample.labels.get(k) == v for k, v in wanted.items()):
                found[sample.name] = sample.value
    return found["softdimo_batch_size_sum"], found["softdimo_batch_size_count"]


async def run_load(url: str, target: Target, load: Load, server_metrics: bool = True) -> dict:
    """Warm up, then run `load.rounds` measured rounds; the summary covers the measured rounds only. Batch sizes come
    from the server's /metrics (`server_metrics`; a peer server has none)."""
    seeds = itertools.count()
    async with httpx.AsyncClient(base_url=url, timeout=load.timeout_s, trust_env=False) as client:
        counters = (lambda: batch_counters(client, target)) if server_metrics else _no_counters
        bound = {"concurrency": load.concurrency, "max_requests": load.max_requests, "timeout_s": load.timeout_s}
        if load.warmup_s > 0:
            await closed_loop(url, fixed_requests(target, seeds), duration_s=load.warmup_s, **bound)
        before = await counters()
        samples, walls = [], []
        for _ in range(load.rounds):
            round_samples, wall = await closed_loop(url, fixed_requests(target, seeds), duration_s=load.duration_s, **bound)
            samples += round_samples
            walls.append(wall)
        after = await counters()
    return summarize(samples, walls, concurrency=load.concurrency, batches=(after[0] - before[0], after[1] - before[1]))


async def _no_counters() -> tuple[float, float]:
    return 0.0, 0.0


def summarize(samples: Sequence[RequestResult], walls: Sequence[float], *, concurrency: int, batches: tuple[float, float]) -> dict:
    """Throughput over the measured wall time, client-side latency percentiles of answered requests, error counts."""
    ok = [s for s in samples if s.status == 200]
    images = sum(s.images for s in ok)
    elapsed = sum(walls)
    images_sum, batch_count = batches
    return {
        "concurrency": concurrency, "requests": len(samples), "ok": len(ok), "images": images, "elapsed_s": elapsed,
        "round_s": list(walls), "images_per_s": images / elapsed if elapsed > 0 else 0.0,
        "latency_ms": latency_summary([s.latency_s for s in ok]),
        "queue_ms": latency_summary([s.queue_s for s in ok])["mean"],
        "compute_ms": latency_summary([s.compute_s for s in ok])["mean"],
        "batches": int(batch_count), "mean_batch_size": images_sum / batch_count if batch_count else None,
        "status_429": sum(s.status == 429 for s in samples), "status_5xx": sum(500 <= s.status < 600 for s in samples),
        "errors": sum(s.status == 0 for s in samples),
        "other_status": sum(s.status not in (0, 200, 429) and not 500 <= s.status < 600 for s in samples),
    }  # fmt: skip


# ---------------------------------------------------------------- options every server suite shares


@dataclass(frozen=True, kw_only=True)
class ServerBench(RuntimeOptions):
    device: str = "auto"
    max_batch_size: int = 16  # the batched server's --max-batch-size
    max_wait_ms: float | None = None  # None: the server's default
    duration_s: float = 10.0  # measured time per load level
    warmup_s: float = 2.0  # warm-up per load level, dropped
    max_requests: int = 100_000  # per round, whatever the duration
    timeout_s: float = 120.0  # per request, client-side
    repeats: int = 5  # timed calls of each offline measurement (median)
    server: str = "process"  # "process" or "thread"

    def __post_init__(self):
        super().__post_init__()
        positive = {
            "max_batch_size": self.max_batch_size, "duration_s": self.duration_s, "max_requests": self.max_requests,
            "timeout_s": self.timeout_s, "repeats": self.repeats, "max_wait_ms": self.max_wait_ms,
        }  # fmt: skip
        check_options(positive=positive, non_negative={"warmup_s": self.warmup_s})

    def runtime(self) -> RuntimeSettings:
        """The one runtime of a suite that compares nothing but what it names (bench steps, bench refine)."""
        arms = self.arms({})
        if len(arms) > 1:
            raise BenchError("two runtime settings are compared by bench serve or bench offline; give one value here")
        return arms[0]["runtime"]

    def spec(self, weights: Sequence[str], max_batch_size: int, runtime: RuntimeSettings = RuntimeSettings()) -> ServerSpec:
        absolute = tuple(str(Path(w).resolve()) for w in weights)
        return ServerSpec(
            weights=absolute, device=self.device, max_batch_size=max_batch_size, max_wait_ms=self.max_wait_ms, mode=self.server,
            runtime=runtime,
        )  # fmt: skip

    def load(self, concurrency: int) -> Load:
        return Load(
            concurrency=concurrency, duration_s=self.duration_s, warmup_s=self.warmup_s, max_requests=self.max_requests,
            timeout_s=self.timeout_s,
        )  # fmt: skip


def _model_info(path: str) -> dict:
    config = read_bundle(path).config
    return {"path": str(path), "name": config["name"], "kind": config["kind"]}


def _offline_seconds(
    model: str, device, *, endpoint: str, batch_sizes: Sequence[int], tteo_steps: int | None, repeats: int,
    runtime: RuntimeSettings = RuntimeSettings(),
) -> tuple[dict[int, float], int | None]:  # fmt: skip
    """Median seconds of one batch at each size, run in this process as the server's batch function runs it."""
    pipeline = load_pipeline(model, device)
    run = Runtime(runtime, max_batch_size=max(batch_sizes))
    steps = None
    if endpoint == "refine":
        steps = tteo_steps or pipeline.tteo.steps
    seconds = {}
    for b in batch_sizes:
        if endpoint == "refine":
            refine = refine_call(pipeline, b, steps)

            def call(refine=refine):
                with run.running(pipeline):
                    return refine()
        else:
            condition, _ = example_inputs(pipeline, b)
            call = functools.partial(run.generate, pipeline, condition, list(range(b)))
        seconds[b] = median_seconds(call, repeats=repeats, warmup=WARMUP_CALLS, device=device)
    del pipeline
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()  # leave the device to the server
    return seconds, steps


def _level_row(level: dict) -> list:
    lat = level["latency_ms"]
    return [
        level["concurrency"], level["requests"], level["images_per_s"], lat["p50"], lat["p95"], lat["p99"],
        level["mean_batch_size"], level["queue_ms"], level["compute_ms"], level["status_429"], level["status_5xx"],
        level["errors"],
    ]  # fmt: skip


LEVEL_COLUMNS = [
    "concurrency", "requests", "images/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "queue ms", "compute ms",
    "429", "5xx", "errors",
]  # fmt: skip


# ---------------------------------------------------------------- bench serve


@dataclass(frozen=True, kw_only=True)
class ServeBench(ServerBench):
    model: tuple[str, ...]  # one bundle folder, or two to compare
    concurrency: tuple[int, ...] = DEFAULT_BATCH_SIZES
    compare_batch_size: int = 1  # the other server's --max-batch-size
    endpoint: str = "generate"  # "generate" or "refine"
    tteo_steps: int | None = None  # /refine: TTEO steps per request; None: the bundle's
    peer: str | None = None  # "litserve": the model behind LitServe (server/litserve_peer.py) is arm B

    def __post_init__(self):
        if isinstance(self.model, str):  # one folder may be given as a string
            object.__setattr__(self, "model", (self.model,))
        super().__post_init__()
        positive = {"concurrency": self.concurrency, "compare_batch_size": self.compare_batch_size, "tteo_steps": self.tteo_steps}
        check_options(positive=positive)
        if self.endpoint not in ("generate", "refine"):
            raise BenchError("--endpoint is generate or refine")
        arms = self.serve_arms()  # one value or two for each option
        if self.peer is not None:
            if self.peer not in PEERS:
                raise BenchError(f"--peer is one of {', '.join(PEERS)}")
            if len(arms) != 1 or self.endpoint != "generate":
                raise BenchError("--peer serves one model's /generate: give one --model and one runtime setting")

    def serve_arms(self) -> list[dict]:
        return self.arms({"model": self.model})


def run_serve(config: ServeBench, command: str) -> dict:
    """One arm: the concurrency sweep against a batched and an unbatched server, and how both compare with offline.
    Two arms (two models, or two runtime settings): both servers up at once, and at each level interleaved rounds."""
    arms = config.serve_arms()
    if len(arms) == 2 or config.peer is not None:
        return run_serve_comparison(config, command, arms)
    device = resolve_device(config.device)
    model_path, runtime = arms[0]["model"], arms[0]["runtime"]
    model = _model_info(model_path)
    offline, steps = _offline_seconds(
        model_path, device, endpoint=config.endpoint, batch_sizes=sorted({1, config.max_batch_size}),
        tteo_steps=config.tteo_steps, repeats=config.repeats, runtime=runtime,
    )  # fmt: skip
    path = f"/{config.endpoint}"
    runs = {}
    for label, batch_size in (("batched", config.max_batch_size), ("unbatched", config.compare_batch_size)):
        with running_server(config.spec([model_path], batch_size, runtime)) as url:
            target = target_for(model_cards(url)[model["name"]], path, steps)
            levels = [asyncio.run(run_load(url, target, config.load(c))) for c in config.concurrency]
        runs[label] = {"max_batch_size": batch_size, "levels": levels}
    return {
        "bench": "serve", "machine": machine_info(device, command), "config": asdict(config), "model": model,
        "runtime": runtime.to_dict(), "endpoint": path, "tteo_steps": steps,
        **serve_comparisons(runs, offline, config.max_batch_size),
    }  # fmt: skip


def run_serve_comparison(config: ServeBench, command: str, arms: list[dict]) -> dict:
    """Two servers, A and B, each with its model and runtime and --max-batch-size, up at the same time. At each
    concurrency level both are warmed up, then measured in `rounds` interleaved rounds of duration_s / rounds each
    (A, B, B, A, …), so both see the same machine within seconds of each other. With `config.peer`, A is the one
    model behind the peer server, batching as softdimo does (the same largest batch and wait for company), and B is
    softdimo, so that B / A is what softdimo gains."""
    device = resolve_device(config.device)
    path = f"/{config.endpoint}"
    peer = PEERS[config.peer]() if config.peer is not None else None  # checked before any server starts
    round_load = replace(config.load(1), duration_s=config.duration_s / config.rounds, warmup_s=0.0)
    levels = []
    with contextlib.ExitStack() as stack:
        servers = []  # (url, target, whether it has softdimo's /metrics, how the table describes it)
        for arm in arms:
            model = _model_info(arm["model"])
            url = stack.enter_context(running_server(config.spec([arm["model"]], config.max_batch_size, arm["runtime"])))
            target = target_for(model_cards(url)[model["name"]], path, config.tteo_steps)
            servers.append((url, target, True, {**model, "runtime": arm["runtime"].to_dict()}))
        if peer is not None:
            _, target, _, described = servers[0]
            url = stack.enter_context(peer_server(config, arms[0]["model"]))
            servers.insert(0, (url, target, False, {**described, "server": peer}))
        for concurrency in config.concurrency:
            if config.warmup_s > 0:
                for url, target, metrics, _ in servers:
                    asyncio.run(run_load(url, target, replace(round_load, concurrency=concurrency, duration_s=config.warmup_s), metrics))
            load = replace(round_load, concurrency=concurrency)
            measures = [lambda u=url, t=target, m=metrics: asyncio.run(run_load(u, t, load, m)) for url, target, metrics, _ in servers]
            a, b = interleaved(measures, rounds=config.rounds)
            stats = compare_rounds([r["images_per_s"] for r in a], [r["images_per_s"] for r in b])
            levels.append({"concurrency": concurrency, **stats, "rounds_measured": {"A": a, "B": b}})
    return {
        "bench": "serve", "machine": machine_info(device, command), "config": asdict(config), "endpoint": path,
        "arms": [{"label": label, **described} for label, (*_, described) in zip("AB", servers)], "comparison": levels,
    }  # fmt: skip


def _litserve_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"LitServe {version('litserve')}"
    except PackageNotFoundError as exc:
        raise BenchError("--peer litserve needs LitServe: pip install litserve") from exc


PEERS = {"litserve": _litserve_version}  # peer server -> what it is, by its installed version


@contextmanager
def peer_server(config: ServeBench, model: str) -> Iterator[str]:
    """The model behind the peer server in a child process (server/litserve_peer.py), batching as `config`'s server
    does: the same largest batch and the same wait for company (the server's default when not given)."""
    wait_ms = config.max_wait_ms if config.max_wait_ms is not None else Settings.model_fields["max_wait_ms"].default
    command = lambda port: [  # noqa: E731
        sys.executable, "-m", "server.litserve_peer", "--model", str(Path(model).resolve()), "--port", str(port),
        "--device", config.device, "--max-batch-size", str(config.max_batch_size), "--batch-timeout-ms", str(wait_ms),
    ]  # fmt: skip
    try:
        with child_server(command, ready_path="/health", ready_timeout_s=300) as (_, url):
            yield url
    except ServerStartError as exc:
        raise BenchError(str(exc)) from exc


def serve_comparisons(runs: dict, offline: dict[int, float], max_batch_size: int) -> dict:
    """Every derived figure of `bench serve`, computed from the measured numbers it is returned with."""
    batched = {level["concurrency"]: level for level in runs["batched"]["levels"]}
    unbatched = {level["concurrency"]: level for level in runs["unbatched"]["levels"]}
    comparison = [
        {
            "concurrency": c, "batched_images_per_s": batched[c]["images_per_s"],
            "unbatched_images_per_s": unbatched[c]["images_per_s"],
            "ratio": ratio(batched[c]["images_per_s"], unbatched[c]["images_per_s"]),
        }
        for c in batched if c in unbatched
    ]  # fmt: skip
    latency_at_1 = None
    if 1 in batched and batched[1]["latency_ms"]["p50"] is not None:
        p50, forward = batched[1]["latency_ms"]["p50"], offline[1] * 1000
        latency_at_1 = {"p50_ms": p50, "forward_ms": forward, "overhead_ms": p50 - forward, "target_ms": LATENCY_TARGET_MS}
    best = max(batched.values(), key=lambda level: level["images_per_s"])
    offline_rate = max_batch_size / offline[max_batch_size]
    return {
        "offline": {
            "batch_1_s": offline[1], "batch_size": max_batch_size, "batch_s": offline[max_batch_size],
            "batched_images_per_s": offline_rate,
        },
        "runs": runs, "comparison": comparison, "latency_at_1": latency_at_1,
        "saturation": {
            "server_images_per_s": best["images_per_s"], "at_concurrency": best["concurrency"],
            "offline_images_per_s": offline_rate, "fraction": ratio(best["images_per_s"], offline_rate),
        },
    }  # fmt: skip


def serve_comparison_table(result: dict) -> str:
    a, b = result["arms"]
    cfg = result["config"]

    def median(rounds: list[dict], key) -> float | None:
        values = [key(r) for r in rounds if key(r) is not None]
        return statistics.median(values) if values else None

    rows = []
    for level in result["comparison"]:
        ra, rb = level["rounds_measured"]["A"], level["rounds_measured"]["B"]
        p50 = lambda r: r["latency_ms"]["p50"]  # noqa: E731
        p99 = lambda r: r["latency_ms"]["p99"]  # noqa: E731
        failed = lambda rounds: sum(r["requests"] - r["ok"] for r in rounds)  # noqa: E731
        rows.append([
            level["concurrency"], level["a"], level["b"], level["ratio"], ratio_range(level), median(ra, p50), median(rb, p50),
            median(ra, p99), median(rb, p99), failed(ra), failed(rb),
        ])  # fmt: skip
    table = markdown_table(
        ["concurrency", "A images/s", "B images/s", "B / A", "B / A range", "A p50 ms", "B p50 ms", "A p99 ms", "B p99 ms",
         "A failed", "B failed"], rows,
    )  # fmt: skip
    arm = lambda x: f"`{x['name']}` from `{x['path']}` ({x['kind']}; {runtime_words(x['runtime'])})"  # noqa: E731
    server = lambda x: x.get("server", "softdimo")  # noqa: E731
    return (
        f"{machine_header(result['machine'])}\n\n`{result['endpoint']}`, A: {server(a)} serving {arm(a)}, B: {server(b)} serving "
        f"{arm(b)}; both servers up at once (largest batch {cfg['max_batch_size']}), closed loop. Each level: "
        f"{cfg['warmup_s']:g} s warm-up on each, then {cfg['rounds']} rounds of {cfg['duration_s'] / cfg['rounds']:g} s per "
        f"server interleaved A, B, B, A, …; images/s is each server's median round, B / A the median of the rounds' ratios "
        f"and its range their least and greatest, p50 and p99 the median round's.\n\n{table}\n"
    )


def serve_table(result: dict) -> str:
    if "arms" in result:  # two servers compared
        return serve_comparison_table(result)
    model, offline = result["model"], result["offline"]
    parts = [
        machine_header(result["machine"]),
        f"`{result['endpoint']}` on `{model['name']}` ({model['kind']}; {runtime_words(result['runtime'])}), closed loop, "
        f"{result['config']['duration_s']:g} s per level after {result['config']['warmup_s']:g} s warm-up.",
    ]
    for label, run in result["runs"].items():
        table = markdown_table(LEVEL_COLUMNS, [_level_row(level) for level in run["levels"]])
        parts.append(f"**{label}: --max-batch-size {run['max_batch_size']}**\n\n{table}")
    b, u = result["runs"]["batched"]["max_batch_size"], result["runs"]["unbatched"]["max_batch_size"]
    rows = [[c["concurrency"], c["batched_images_per_s"], c["unbatched_images_per_s"], c["ratio"]] for c in result["comparison"]]
    parts.append(markdown_table(["concurrency", f"images/s (max batch {b})", f"images/s (max batch {u})", "ratio"], rows))
    lines = []
    if result["latency_at_1"]:
        lat = result["latency_at_1"]
        lines.append(
            f"- p50 at concurrency 1: {lat['p50_ms']:.2f} ms against {lat['forward_ms']:.2f} ms offline at batch 1: "
            f"overhead {lat['overhead_ms']:.2f} ms (target ≤ {lat['target_ms']:g} ms)"
        )
    sat = result["saturation"]
    lines.append(
        f"- saturation: {sat['server_images_per_s']:.1f} images/s at concurrency {sat['at_concurrency']}, "
        f"{100 * sat['fraction']:.0f}% of the offline rate at batch {offline['batch_size']} "
        f"({sat['offline_images_per_s']:.1f} images/s)"
    )
    parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot_serve(result: dict, folder: str | os.PathLike) -> list[Path]:
    """throughput.png and latency.png against concurrency, batched vs unbatched; nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("softdimo bench: skipping --plot: matplotlib is not installed (pip install 'softdimo[bench]')", file=sys.stderr)
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]

    def series(label: str, key):
        levels = runs[label]["levels"]
        return [lv["concurrency"] for lv in levels], [key(lv) for lv in levels]

    throughput = {"": lambda level: level["images_per_s"]}
    latency = {" p50": lambda level: level["latency_ms"]["p50"], " p99": lambda level: level["latency_ms"]["p99"]}
    device = result["machine"].get("gpu") or result["machine"]["device"]
    written = []
    for name, ylabel, keys in (("throughput.png", "images/s", throughput), ("latency.png", "client-side latency (ms)", latency)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for colour, label in enumerate(runs):  # one colour per server, one line style per statistic
            for style, (suffix, key) in zip(("-", "--"), keys.items()):
                xs, ys = series(label, key)
                legend = f"--max-batch-size {runs[label]['max_batch_size']}{suffix}"
                ax.plot(xs, ys, f"o{style}", color=f"C{colour}", label=legend)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrency (closed-loop clients)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{result['endpoint']} on {result['model']['name']} ({device})")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(folder / name)
    return written


# ---------------------------------------------------------------- bench steps


@dataclass(frozen=True, kw_only=True)
class StepsBench(ServerBench):
    one_step: str
    teacher: str
    steps: tuple[int, ...] = (4, 8, 16)
    concurrency: int = 16

    def __post_init__(self):
        super().__post_init__()
        check_options(positive={"steps": self.steps, "concurrency": self.concurrency})


def run_steps(config: StepsBench, command: str) -> dict:
    """Images/s of the one-step model and of the teacher at each steps value, both served by one server."""
    device = resolve_device(config.device)
    one_step, teacher = _model_info(config.one_step), _model_info(config.teacher)
    if teacher["kind"] != "masked-diffusion":
        raise BenchError(f"--teacher {config.teacher} is {teacher['kind']}, not a masked-diffusion bundle")
    with running_server(config.spec([config.one_step, config.teacher], config.max_batch_size, config.runtime())) as url:
        cards = model_cards(url)
        load = config.load(config.concurrency)
        fast = asyncio.run(run_load(url, target_for(cards[one_step["name"]], "/generate"), load))
        slow = {s: asyncio.run(run_load(url, target_for(cards[teacher["name"]], "/generate", s), load)) for s in config.steps}
    rows = [
        {
            "steps": s, "one_step_images_per_s": fast["images_per_s"], "teacher_images_per_s": slow[s]["images_per_s"],
            "ratio": ratio(fast["images_per_s"], slow[s]["images_per_s"]),
        }
        for s in config.steps
    ]  # fmt: skip
    return {
        "bench": "steps", "machine": machine_info(device, command), "config": asdict(config),
        "one_step": {**one_step, "load": fast}, "teacher": {**teacher, "loads": [{"steps": s, **slow[s]} for s in config.steps]},
        "rows": rows,
    }  # fmt: skip


def steps_table(result: dict) -> str:
    fast = result["one_step"]["load"]
    slow = {load["steps"]: load for load in result["teacher"]["loads"]}
    rows = [
        [
            r["steps"], r["one_step_images_per_s"], r["teacher_images_per_s"], r["ratio"], fast["latency_ms"]["p50"],
            slow[r["steps"]]["latency_ms"]["p50"],
        ]
        for r in result["rows"]
    ]  # fmt: skip
    columns = ["teacher steps", "one-step images/s", "teacher images/s", "ratio", "one-step p50 ms", "teacher p50 ms"]
    table = markdown_table(columns, rows)
    cfg = result["config"]
    return (
        f"{machine_header(result['machine'])}\n\n`{result['one_step']['name']}` against `{result['teacher']['name']}` "
        f"through one server (--max-batch-size {cfg['max_batch_size']}), concurrency {cfg['concurrency']}, "
        f"{cfg['duration_s']:g} s per model and steps value.\n\n{table}\n"
    )


# ---------------------------------------------------------------- bench refine


@dataclass(frozen=True, kw_only=True)
class RefineBench(ServerBench):
    model: str
    requests: int = 16  # sent at once, against the batched and the serial server
    tteo_steps: int | None = None  # None: the bundle's
    rounds: int = 3  # bursts measured on each server (one more is run first as warm-up)

    def __post_init__(self):
        super().__post_init__()
        check_options(positive={"requests": self.requests, "tteo_steps": self.tteo_steps, "rounds": self.rounds})


def run_refine(config: RefineBench, command: str) -> dict:
    """One TTEO step against one forward, and a burst of /refine requests batched against run one at a time."""
    device = resolve_device(config.device)
    runtime = config.runtime()  # for the servers; the offline step cost runs the plain path
    model = _model_info(config.model)
    pipeline = load_pipeline(config.model, device)
    steps = config.tteo_steps or pipeline.tteo.steps
    step_cost = tteo_step_cost(pipeline, steps=steps, batch_size=1, repeats=config.repeats, warmup=WARMUP_CALLS)
    del pipeline
    burst = Load(
        concurrency=config.requests, max_requests=config.requests, rounds=config.rounds,
        duration_s=config.timeout_s, warmup_s=config.timeout_s, timeout_s=config.timeout_s,
    )  # each round is exactly one burst: bounded by count, the duration only a backstop  # fmt: skip
    runs = {}
    for label, batch_size in (("batched", config.max_batch_size), ("serial", 1)):
        with running_server(config.spec([config.model], batch_size, runtime)) as url:
            target = target_for(model_cards(url)[model["name"]], "/refine", steps)
            runs[label] = {"max_batch_size": batch_size, **asyncio.run(run_load(url, target, burst))}
    return {
        "bench": "refine", "machine": machine_info(device, command), "config": asdict(config), "model": model,
        "tteo_steps": steps, "step_cost": step_cost, "runs": runs,
        "ratio": ratio(runs["batched"]["images_per_s"], runs["serial"]["images_per_s"]),
    }  # fmt: skip


def refine_table(result: dict) -> str:
    cost = result["step_cost"]
    cost_table = markdown_table(
        [
            "TTEO steps", "batch", "forward ms", f"refine ms ({cost['tteo_steps']} steps)", "refine ms (0 steps)", "ms / step",
            "step / forward",
        ],
        [[cost["tteo_steps"], cost["batch_size"], cost["forward_s"] * 1000, cost["refine_s"] * 1000,
          cost["refine_zero_steps_s"] * 1000, cost["step_s"] * 1000, cost["step_over_forward"]]],
    )  # fmt: skip
    rows = [
        [f"{label} (--max-batch-size {run['max_batch_size']})", run["images_per_s"], run["latency_ms"]["p50"],
         run["latency_ms"]["p99"], run["mean_batch_size"], run["status_429"] + run["status_5xx"] + run["errors"]]
        for label, run in result["runs"].items()
    ]  # fmt: skip
    burst_table = markdown_table(["server", "images/s", "p50 ms", "p99 ms", "mean batch", "failed"], rows)
    cfg = result["config"]
    return (
        f"{machine_header(result['machine'])}\n\nTTEO on `{result['model']['name']}`: one step against one forward + decode "
        f"(offline, median of {cfg['repeats']}).\n\n{cost_table}\n\n"
        f"{cfg['requests']} concurrent `/refine` requests ({result['tteo_steps']} steps each), {cfg['rounds']} bursts per server "
        f"after one warm-up burst; batched / serial = {result['ratio']:.2f}×.\n\n{burst_table}\n"
    )
