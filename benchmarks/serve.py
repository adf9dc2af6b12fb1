"""`softdimo bench serve`: a concurrency sweep batched against unbatched, or two servers side by side (a peer's too)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import statistics
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

from benchmarks.hey import require_hey
from benchmarks.load import BUILTIN, HEY, LOAD_GENERATORS, Load, run_load, target_for
from benchmarks.options import ServerBench, model_info
from benchmarks.running import ServerStartError, child_server
from benchmarks.server_metrics import stage_summary
from benchmarks.server_under_test import model_cards, running_server
from server.metrics import REQUEST_STAGES
from server.settings import Settings
from softdimo.bench import refine_call
from softdimo.bench_run import (
    DEFAULT_BATCH_SIZES,
    BenchError,
    check_options,
    machine_header,
    machine_info,
    runtime_words,
)
from softdimo.device import resolve_device
from softdimo.pipeline import load_pipeline
from softdimo.runtime import Runtime, RuntimeSettings
from softdimo.tables import markdown_table
from softdimo.timing import WARMUP_CALLS, compare_rounds, interleaved, median_seconds, ratio, ratio_range
from softdimo.warmup import example_inputs


LATENCY_TARGET_MS = 5.0  # p50 at concurrency 1 may exceed the offline forward time by at most this


def _offline_seconds(
    model: str,
    device,
    *,
    endpoint: str,
    batch_sizes: Sequence[int],
    tteo_steps: int | None,
    repeats: int,
    runtime: RuntimeSettings = RuntimeSettings(),
) -> tuple[dict[int, float], int | None]:
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
        level["concurrency"],
        level["requests"],
        level["images_per_s"],
        lat["p50"],
        lat["p95"],
        lat["p99"],
        level["mean_batch_size"],
        level["queue_ms"],
        level["compute_ms"],
        level["status_429"],
        level["status_5xx"],
        level["errors"],
    ]


LEVEL_COLUMNS = [
    "concurrency",
    "requests",
    "images/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "mean batch",
    "queue ms",
    "compute ms",
    "429",
    "5xx",
    "errors",
]


@dataclass(frozen=True, kw_only=True)
class ServeBench(ServerBench):
    model: tuple[str, ...]  # one bundle folder, or two to compare
    concurrency: tuple[int, ...] = DEFAULT_BATCH_SIZES
    compare_batch_size: int = 1  # the other server's --max-batch-size
    endpoint: str = "generate"  # "generate" or "refine"
    tteo_steps: int | None = None  # /refine: TTEO steps per request; None: the bundle's
    peer: str | None = None  # "litserve": the model behind LitServe (benchmarks/litserve_peer.py) is arm B
    load_generator: str = BUILTIN  # a key of benchmarks.load.LOAD_GENERATORS: this project's client, or hey

    def __post_init__(self):
        if isinstance(self.model, str):  # one folder may be given as a string
            object.__setattr__(self, "model", (self.model,))
        super().__post_init__()
        positive = {
            "concurrency": self.concurrency,
            "compare_batch_size": self.compare_batch_size,
            "tteo_steps": self.tteo_steps,
        }
        check_options(positive=positive)
        if self.endpoint not in ("generate", "refine"):
            raise BenchError("--endpoint is generate or refine")
        if self.load_generator not in LOAD_GENERATORS:
            raise BenchError(f"--load-generator is one of {', '.join(LOAD_GENERATORS)}")
        if self.load_generator == HEY:
            require_hey()
        arms = self.serve_arms()  # one value or two for each option
        if self.peer is not None:
            if self.peer not in PEERS:
                raise BenchError(f"--peer is one of {', '.join(PEERS)}")
            if len(arms) != 1 or self.endpoint != "generate":
                raise BenchError("--peer serves one model's /generate: give one --model and one runtime setting")

    def serve_arms(self) -> list[dict]:
        return self.arms({"model": self.model})

    def load(self, concurrency: int) -> Load:
        return replace(super().load(concurrency), generator=self.load_generator)


def load_words(config: dict) -> str:
    """Which load generator a result's figures come from, for the line above its table."""
    return "load: " + LOAD_GENERATORS[config["load_generator"]]


def run_serve(config: ServeBench, command: str) -> dict:
    """One arm: the concurrency sweep against a batched and an unbatched server, and how both compare with offline.
    Two arms (two models, or two runtime settings): both servers up at once, and at each level interleaved rounds."""
    arms = config.serve_arms()
    if len(arms) == 2 or config.peer is not None:
        return run_serve_comparison(config, command, arms)
    device = resolve_device(config.device)
    model_path, runtime = arms[0]["model"], arms[0]["runtime"]
    model = model_info(model_path)
    offline, steps = _offline_seconds(
        model_path,
        device,
        endpoint=config.endpoint,
        batch_sizes=sorted({1, config.max_batch_size}),
        tteo_steps=config.tteo_steps,
        repeats=config.repeats,
        runtime=runtime,
    )
    path = f"/{config.endpoint}"
    runs = {}
    for label, batch_size in (("batched", config.max_batch_size), ("unbatched", config.compare_batch_size)):
        with running_server(config.spec([model_path], batch_size, runtime)) as url:
            target = target_for(model_cards(url)[model["name"]], path, steps)
            levels = [asyncio.run(run_load(url, target, config.load(c))) for c in config.concurrency]
        runs[label] = {"max_batch_size": batch_size, "levels": levels}
    return {
        "bench": "serve",
        "machine": machine_info(device, command),
        "config": asdict(config),
        "model": model,
        "runtime": runtime.to_dict(),
        "endpoint": path,
        "tteo_steps": steps,
        **serve_comparisons(runs, offline, config.max_batch_size),
    }


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
            model = model_info(arm["model"])
            url = stack.enter_context(
                running_server(config.spec([arm["model"]], config.max_batch_size, arm["runtime"]))
            )
            target = target_for(model_cards(url)[model["name"]], path, config.tteo_steps)
            servers.append((url, target, True, {**model, "runtime": arm["runtime"].to_dict()}))
        if peer is not None:
            _, target, _, described = servers[0]
            url = stack.enter_context(peer_server(config, arms[0]["model"]))
            servers.insert(0, (url, target, False, {**described, "server": peer}))
        for concurrency in config.concurrency:
            if config.warmup_s > 0:
                for url, target, metrics, _ in servers:
                    asyncio.run(
                        run_load(
                            url,
                            target,
                            replace(round_load, concurrency=concurrency, duration_s=config.warmup_s),
                            metrics,
                        )
                    )
            load = replace(round_load, concurrency=concurrency)
            measures = [
                lambda u=url, t=target, m=metrics: asyncio.run(run_load(u, t, load, m))
                for url, target, metrics, _ in servers
            ]
            a, b = interleaved(measures, rounds=config.rounds)
            stats = compare_rounds([r["images_per_s"] for r in a], [r["images_per_s"] for r in b])
            levels.append({"concurrency": concurrency, **stats, "rounds_measured": {"A": a, "B": b}})
    return {
        "bench": "serve",
        "machine": machine_info(device, command),
        "config": asdict(config),
        "endpoint": path,
        "arms": [{"label": label, **described} for label, (*_, described) in zip("AB", servers)],
        "comparison": levels,
    }


def _litserve_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"LitServe {version('litserve')}"
    except PackageNotFoundError as exc:
        raise BenchError("--peer litserve needs LitServe: pip install litserve") from exc


PEERS = {"litserve": _litserve_version}  # peer server -> what it is, by its installed version


@contextmanager
def peer_server(config: ServeBench, model: str) -> Iterator[str]:
    """The model behind the peer server in a child process (benchmarks/litserve_peer.py), batching as `config`'s server
    does: the same largest batch and the same wait for company (the server's default when not given)."""
    wait_ms = config.max_wait_ms if config.max_wait_ms is not None else Settings.model_fields["max_wait_ms"].default
    command = lambda port: [  # noqa: E731
        sys.executable,
        "-m",
        "benchmarks.litserve_peer",
        "--model",
        str(Path(model).resolve()),
        "--port",
        str(port),
        "--device",
        config.device,
        "--max-batch-size",
        str(config.max_batch_size),
        "--batch-timeout-ms",
        str(wait_ms),
    ]
    try:
        with child_server(command, ready_path="/health", ready_timeout_s=300) as (_, url):
            yield url
    except ServerStartError as exc:
        raise BenchError(str(exc)) from exc


STAGES_LINE = (
    "Where the requests spent their time in the server (its softdimo_request_stage_seconds, server/timeline.py), "
    "mean / p99 ms per request; p99 is read from the histogram's buckets, so it is only as fine as they are."
)


def stage_table(levels: list[tuple[int, list[dict]]]) -> str:
    """One row per (concurrency, the measured rounds' stages): each stage's mean / p99 ms over those rounds."""
    rows = []
    for concurrency, rounds in levels:
        summary = stage_summary(rounds)
        cells = [
            None if summary[s]["mean_ms"] is None else f"{summary[s]['mean_ms']:.3g} / {summary[s]['p99_ms']:.3g}"
            for s in REQUEST_STAGES
        ]
        rows.append([concurrency, *cells])
    return markdown_table(["concurrency", *(f"{stage} ms" for stage in REQUEST_STAGES)], rows)


def serve_comparisons(runs: dict, offline: dict[int, float], max_batch_size: int) -> dict:
    """Every derived figure of `bench serve`, computed from the measured numbers it is returned with."""
    batched = {level["concurrency"]: level for level in runs["batched"]["levels"]}
    unbatched = {level["concurrency"]: level for level in runs["unbatched"]["levels"]}
    comparison = [
        {
            "concurrency": c,
            "batched_images_per_s": batched[c]["images_per_s"],
            "unbatched_images_per_s": unbatched[c]["images_per_s"],
            "ratio": ratio(batched[c]["images_per_s"], unbatched[c]["images_per_s"]),
        }
        for c in batched
        if c in unbatched
    ]
    latency_at_1 = None
    if 1 in batched and batched[1]["latency_ms"]["p50"] is not None:
        p50, forward = batched[1]["latency_ms"]["p50"], offline[1] * 1000
        latency_at_1 = {
            "p50_ms": p50,
            "forward_ms": forward,
            "overhead_ms": p50 - forward,
            "target_ms": LATENCY_TARGET_MS,
        }
    best = max(batched.values(), key=lambda level: level["images_per_s"])
    offline_rate = max_batch_size / offline[max_batch_size]
    return {
        "offline": {
            "batch_1_s": offline[1],
            "batch_size": max_batch_size,
            "batch_s": offline[max_batch_size],
            "batched_images_per_s": offline_rate,
        },
        "runs": runs,
        "comparison": comparison,
        "latency_at_1": latency_at_1,
        "saturation": {
            "server_images_per_s": best["images_per_s"],
            "at_concurrency": best["concurrency"],
            "offline_images_per_s": offline_rate,
            "fraction": ratio(best["images_per_s"], offline_rate),
        },
    }


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
        rows.append(
            [
                level["concurrency"],
                level["a"],
                level["b"],
                level["ratio"],
                ratio_range(level),
                median(ra, p50),
                median(rb, p50),
                median(ra, p99),
                median(rb, p99),
                failed(ra),
                failed(rb),
            ]
        )
    table = markdown_table(
        [
            "concurrency",
            "A images/s",
            "B images/s",
            "B / A",
            "B / A range",
            "A p50 ms",
            "B p50 ms",
            "A p99 ms",
            "B p99 ms",
            "A failed",
            "B failed",
        ],
        rows,
    )
    arm = lambda x: f"`{x['name']}` from `{x['path']}` ({x['kind']}; {runtime_words(x['runtime'])})"  # noqa: E731
    server = lambda x: x.get("server", "softdimo")  # noqa: E731
    stage_tables = ""
    for label in "AB":  # softdimo's arms: a peer server reports no stages
        levels = [(level["concurrency"], level["rounds_measured"][label]) for level in result["comparison"]]
        if all(r["stages"] is not None for _, rounds in levels for r in rounds):
            table_rows = [(concurrency, [r["stages"] for r in rounds]) for concurrency, rounds in levels]
            stage_tables += f"\n{label}: {STAGES_LINE} Over all its rounds.\n\n{stage_table(table_rows)}\n"
    return (
        f"{machine_header(result['machine'])}\n\n`{result['endpoint']}`, A: {server(a)} serving {arm(a)}, B: {server(b)} serving "
        f"{arm(b)}; both servers up at once (largest batch {cfg['max_batch_size']}), {load_words(cfg)}. Each level: "
        f"{cfg['warmup_s']:g} s warm-up on each, then {cfg['rounds']} rounds of {cfg['duration_s'] / cfg['rounds']:g} s per "
        f"server interleaved A, B, B, A, …; images/s is each server's median round, B / A the median of the rounds' ratios "
        f"and its range their least and greatest, p50 and p99 the median round's.\n\n{table}\n{stage_tables}"
    )


def serve_table(result: dict) -> str:
    if "arms" in result:  # two servers compared
        return serve_comparison_table(result)
    model, offline = result["model"], result["offline"]
    parts = [
        machine_header(result["machine"]),
        f"`{result['endpoint']}` on `{model['name']}` ({model['kind']}; {runtime_words(result['runtime'])}), "
        f"{load_words(result['config'])}, "
        f"{result['config']['duration_s']:g} s per level after {result['config']['warmup_s']:g} s warm-up.",
    ]
    for label, run in result["runs"].items():
        table = markdown_table(LEVEL_COLUMNS, [_level_row(level) for level in run["levels"]])
        stages = stage_table([(level["concurrency"], [level["stages"]]) for level in run["levels"]])
        parts.append(f"**{label}: --max-batch-size {run['max_batch_size']}**\n\n{table}\n\n{STAGES_LINE}\n\n{stages}")
    b, u = result["runs"]["batched"]["max_batch_size"], result["runs"]["unbatched"]["max_batch_size"]
    rows = [
        [c["concurrency"], c["batched_images_per_s"], c["unbatched_images_per_s"], c["ratio"]]
        for c in result["comparison"]
    ]
    parts.append(
        markdown_table(["concurrency", f"images/s (max batch {b})", f"images/s (max batch {u})", "ratio"], rows)
    )
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
