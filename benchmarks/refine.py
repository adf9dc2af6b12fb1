"""`softdimo bench refine`: a TTEO step against a forward, and a burst of /refine requests batched against serial."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from benchmarks.load import BUILTIN, LOAD_GENERATORS, Load, run_load, target_for
from benchmarks.options import ServerBench, model_info
from benchmarks.server_under_test import model_cards, running_server
from softdimo.bench import tteo_step_cost
from softdimo.bench_run import check_options, machine_header, machine_info
from softdimo.device import resolve_device
from softdimo.pipeline import load_pipeline
from softdimo.tables import markdown_table
from softdimo.timing import WARMUP_CALLS, ratio


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
    model = model_info(config.model)
    pipeline = load_pipeline(config.model, device)
    steps = config.tteo_steps or pipeline.tteo.steps
    step_cost = tteo_step_cost(pipeline, steps=steps, batch_size=1, repeats=config.repeats, warmup=WARMUP_CALLS)
    del pipeline
    burst = Load(
        concurrency=config.requests,
        max_requests=config.requests,
        rounds=config.rounds,
        duration_s=config.timeout_s,
        warmup_s=config.timeout_s,
        timeout_s=config.timeout_s,
    )  # each round is exactly one burst: bounded by count, the duration only a backstop
    runs = {}
    for label, batch_size in (("batched", config.max_batch_size), ("serial", 1)):
        with running_server(config.spec([config.model], batch_size, runtime)) as url:
            target = target_for(model_cards(url)[model["name"]], "/refine", steps)
            runs[label] = {"max_batch_size": batch_size, **asyncio.run(run_load(url, target, burst))}
    return {
        "bench": "refine",
        "machine": machine_info(device, command),
        "config": asdict(config),
        "model": model,
        "tteo_steps": steps,
        "step_cost": step_cost,
        "runs": runs,
        "ratio": ratio(runs["batched"]["images_per_s"], runs["serial"]["images_per_s"]),
    }


def refine_table(result: dict) -> str:
    cost = result["step_cost"]
    cost_table = markdown_table(
        [
            "TTEO steps",
            "batch",
            "forward ms",
            f"refine ms ({cost['tteo_steps']} steps)",
            "refine ms (0 steps)",
            "ms / step",
            "step / forward",
        ],
        [
            [
                cost["tteo_steps"],
                cost["batch_size"],
                cost["forward_s"] * 1000,
                cost["refine_s"] * 1000,
                cost["refine_zero_steps_s"] * 1000,
                cost["step_s"] * 1000,
                cost["step_over_forward"],
            ]
        ],
    )
    rows = [
        [
            f"{label} (--max-batch-size {run['max_batch_size']})",
            run["images_per_s"],
            run["latency_ms"]["p50"],
            run["latency_ms"]["p99"],
            run["mean_batch_size"],
            run["status_429"] + run["status_5xx"] + run["errors"],
        ]
        for label, run in result["runs"].items()
    ]
    burst_table = markdown_table(["server", "images/s", "p50 ms", "p99 ms", "mean batch", "failed"], rows)
    cfg = result["config"]
    return (
        f"{machine_header(result['machine'])}\n\nTTEO on `{result['model']['name']}`: one step against one forward + decode "
        f"(offline, median of {cfg['repeats']}).\n\n{cost_table}\n\n"
        f"{cfg['requests']} concurrent `/refine` requests ({result['tteo_steps']} steps each), {cfg['rounds']} bursts per server "
        f"after one warm-up burst; batched / serial = {result['ratio']:.2f}×; load: {LOAD_GENERATORS[BUILTIN]}.\n\n"
        f"{burst_table}\n"
    )
