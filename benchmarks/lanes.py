"""`softdimo bench lanes`: /generate latency alone, then under a saturating load of /refine jobs, through one server."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, replace

import httpx

from benchmarks.load import BUILTIN, LOAD_GENERATORS, Target, run_load, target_for
from benchmarks.options import ServerBench, model_info
from benchmarks.server_under_test import model_cards, running_server
from softdimo.bench_run import BenchError, check_options, machine_header, machine_info
from softdimo.device import resolve_device
from softdimo.tables import markdown_table
from softdimo.timing import ratio

_POLL_S = 0.1


@dataclass(frozen=True, kw_only=True)
class LanesBench(ServerBench):
    model: str  # a one-step bundle with a reward
    concurrency: int = 2  # closed-loop /generate clients
    jobs: int = 8  # /refine jobs kept submitted (queued or running) throughout the loaded run
    job_images: int = 8  # images per job
    tteo_steps: int | None = None  # per job; None: the bundle's
    refine_chunk: int | None = None  # the server's --refine-chunk; None: its default

    def __post_init__(self):
        super().__post_init__()
        check_options(
            positive={
                "concurrency": self.concurrency,
                "jobs": self.jobs,
                "job_images": self.job_images,
                "tteo_steps": self.tteo_steps,
                "refine_chunk": self.refine_chunk,
            },
        )


def run_lanes(config: LanesBench, command: str) -> dict:
    """/generate p50 and p99 with the server otherwise idle, then while `jobs` /refine jobs keep its background lane
    busy; the ratio of the two p99s is what interactive traffic pays for the jobs."""
    device = resolve_device(config.device)
    model = model_info(config.model)
    load = config.load(config.concurrency)
    spec = replace(
        config.spec([config.model], config.max_batch_size, config.runtime()), refine_chunk=config.refine_chunk
    )
    with running_server(spec) as url:
        card = model_cards(url)[model["name"]]
        if not card["rewards"]:
            raise BenchError(f"{config.model} has no reward: jobs run /refine, which needs one")
        target = target_for(card, "/generate")
        alone = asyncio.run(run_load(url, target, load))
        job_body = {**target.body, "endpoint": "refine", "n": config.job_images}
        if config.tteo_steps is not None:
            job_body["steps"] = config.tteo_steps
        loaded, jobs = asyncio.run(_under_jobs(url, target, load, job_body, config.jobs))
    return {
        "bench": "lanes",
        "machine": machine_info(device, command),
        "config": asdict(config),
        "model": model,
        "alone": alone,
        "under_jobs": loaded,
        "jobs": jobs,
        "p99_ratio": ratio(loaded["latency_ms"]["p99"], alone["latency_ms"]["p99"]),
    }


async def _under_jobs(url: str, target: Target, load, job_body: dict, jobs: int) -> tuple[dict, dict]:
    """The /generate load while a feeder keeps `jobs` jobs submitted, replacing each as it finishes; the load starts
    once one job runs. Jobs left at the end are cancelled. Returns the load's summary and the jobs' counts."""
    seeds = itertools.count(1_000_000)
    live: set[str] = set()
    finished: list[dict] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:

        async def feed() -> None:
            while not stop.is_set():
                while len(live) < jobs:
                    answer = await client.post("/v1/jobs", json={**job_body, "seed": next(seeds)})
                    if answer.status_code != 202:
                        raise BenchError(f"a job was refused: {answer.status_code} {answer.text[:200]}")
                    live.add(answer.json()["id"])
                for job_id in list(live):
                    job = (await client.get(f"/v1/jobs/{job_id}")).json()
                    if job["status"] in ("succeeded", "failed", "cancelled"):
                        live.discard(job_id)
                        finished.append(job)
                await asyncio.sleep(_POLL_S)

        async def first_job_running() -> None:
            deadline = time.monotonic() + load.timeout_s
            while not any([(await client.get(f"/v1/jobs/{j}")).json()["status"] == "running" for j in list(live)]):
                if time.monotonic() > deadline:
                    raise BenchError("no job started running")
                await asyncio.sleep(_POLL_S)

        feeder = asyncio.create_task(feed())
        try:
            await first_job_running()
            summary = await run_load(url, target, load)
        finally:
            stop.set()
            await asyncio.gather(feeder, return_exceptions=True)
            for job_id in live:
                await client.delete(f"/v1/jobs/{job_id}")
        if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
            raise feeder.exception()
    succeeded = [job for job in finished if job["status"] == "succeeded"]
    compute = [job["result"]["timing"]["compute_s"] for job in succeeded]
    return summary, {
        "kept": jobs,
        "succeeded": len(succeeded),
        "failed": sum(job["status"] == "failed" for job in finished),
        "mean_compute_s": sum(compute) / len(compute) if compute else None,
    }


def lanes_table(result: dict) -> str:
    rows = []
    for label, run in (
        ("alone", result["alone"]),
        (f"under {result['jobs']['kept']} /refine jobs", result["under_jobs"]),
    ):
        latency = run["latency_ms"]
        rows.append([label, run["ok"], f"{latency['p50']:.1f}", f"{latency['p99']:.1f}"])
    table = markdown_table(["/generate", "answered", "p50 ms", "p99 ms"], rows)
    jobs = result["jobs"]
    batch = "n/a" if jobs["mean_compute_s"] is None else f"{jobs['mean_compute_s'] * 1000:.0f} ms"
    chunk = result["config"].get("refine_chunk")
    notes = (
        f"Refine chunk: {'the server default' if chunk is None else chunk}. "
        f"p99 under jobs / alone: {result['p99_ratio']:.2f}. Jobs finished meanwhile: {jobs['succeeded']} "
        f"(compute per job {batch}); failed: {jobs['failed']}."
    )
    return f"{machine_header(result['machine'])}\n\nLoad: {LOAD_GENERATORS[BUILTIN]}.\n\n{table}\n\n{notes}"
