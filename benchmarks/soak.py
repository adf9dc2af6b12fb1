"""A soak test client: mixed /generate and /refine traffic, some of it as jobs, for a while; then status counts,
latencies, memory growth and what became of every job accepted."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

from benchmarks.job_ledger import JobLedger, JobTally
from benchmarks.load import RequestResult, closed_loop
from softdimo.timing import latency_summary

PROMPTS = (
    "a red circle",
    "two blue squares",
    "a green triangle",
    "three cyan triangles",
    "a large yellow circle",
    "a blue square above a red circle",
)
MAX_BACKOFF_S = 5.0  # longest pause a worker takes on a 429 or 503, whatever Retry-After says
JOBS_PATH = "/v1/jobs"
JOB_POLL_S = 0.5  # how often the state of a job not yet final is read
JOB_SHARE = 0.2  # of the requests, sent as jobs
DRAIN_S = 300.0  # longest wait after the traffic for the jobs not yet final


@dataclass
class SoakReport:
    url: str
    duration_s: float
    concurrency: int
    requests: int
    by_status: dict[str, int]  # HTTP status -> responses
    by_endpoint: dict[str, dict[str, int]]  # endpoint -> HTTP status -> responses
    errors: dict[str, int]  # transport errors (no HTTP answer), by exception type
    latency_ms: dict[str, dict[str, float]]  # endpoint -> p50, p95, p99, mean of the 200s (timing.latency_summary)
    rss_start_bytes: float | None  # the server's process_resident_memory_bytes before and after the traffic
    rss_end_bytes: float | None
    models: list[str] = field(default_factory=list)
    job_share: float = 0.0  # the share of requests sent as jobs (POST /v1/jobs)
    jobs: JobTally = field(default_factory=JobTally)  # every job a submission was answered 202 for
    job_drain_s: float = 0.0  # seconds waited after the traffic for the last jobs to become final
    unfinished_jobs: list[str] = field(default_factory=list)  # ids of the jobs not final when the wait ended

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.by_status.items() if status.startswith("5"))

    @property
    def rss_growth_bytes(self) -> float | None:
        if self.rss_start_bytes is None or self.rss_end_bytes is None:
            return None
        return self.rss_end_bytes - self.rss_start_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "server_errors": self.server_errors, "rss_growth_bytes": self.rss_growth_bytes}

    def text(self) -> str:
        lines = [
            f"soak of {self.url}: {self.duration_s:.0f}s at concurrency {self.concurrency}, {self.requests} requests "
            f"to {', '.join(self.models)}",
            "status: " + ", ".join(f"{status} x{count}" for status, count in sorted(self.by_status.items())),
            f"server errors (5xx): {self.server_errors}; transport errors: "
            + (", ".join(f"{name} x{count}" for name, count in sorted(self.errors.items())) or "none"),
        ]
        if self.job_share:
            lines.append(
                f"jobs ({self.job_share:.0%} of requests, {JOBS_PATH}): {self.jobs.text()}; "
                f"waited {self.job_drain_s:.0f}s after the traffic"
            )
            if self.unfinished_jobs:
                lines.append("unfinished jobs: " + ", ".join(self.unfinished_jobs))
        for endpoint, stats in sorted(self.latency_ms.items()):
            lines.append(f"{endpoint} latency of 200s: " + ", ".join(f"{k} {v:.0f} ms" for k, v in stats.items()))
        if self.rss_growth_bytes is not None:
            lines.append(
                f"server resident memory: {self.rss_start_bytes / 2**20:.1f} MiB -> {self.rss_end_bytes / 2**20:.1f} MiB "
                f"({self.rss_growth_bytes / 2**20:+.1f} MiB)"
            )
        else:
            lines.append("server resident memory: not exported by /metrics")
        return "\n".join(lines)


def _routes(models: list[dict]) -> list[tuple[str, dict]]:
    """(endpoint, model card) pairs: /generate for every model, /refine for those whose card lists rewards."""
    return [
        (endpoint, m)
        for m in models
        for endpoint in ("/generate", "/refine")
        if endpoint == "/generate" or m.get("rewards")
    ]


def _pick(routes: list[tuple[str, dict]], rng: random.Random, job_share: float) -> tuple[str, dict]:
    """One request of the mix: an endpoint and its body; with probability `job_share` the same body as a job."""
    endpoint, model = rng.choice(routes)
    if model["conditioning"] == "class":
        condition = {"class_label": rng.randrange(len(model["classes"]))}
    else:
        condition = {"prompt": rng.choice(PROMPTS)}
    body = {"model": model["name"], "seed": rng.randrange(2**31), "n": rng.choice((1, 1, 2, 4)), **condition}
    if endpoint == "/refine":
        body.update(n=1, steps=rng.choice((1, 2, 4)))
    if job_share and rng.random() < job_share:
        return JOBS_PATH, {**body, "endpoint": endpoint.removeprefix("/")}
    return endpoint, body


async def _resident_memory(client: httpx.AsyncClient) -> float | None:
    try:
        text = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return None


async def _read_job(client: httpx.AsyncClient, ledger: JobLedger, job_id: str) -> None:
    """Record the job's state as the server answers it now; an unanswered read is tried again at the next poll."""
    try:
        response = await client.get(f"{JOBS_PATH}/{job_id}")
    except httpx.HTTPError:
        return
    if response.status_code == 200:
        ledger.record(response.json())


async def _wait_for_job(client: httpx.AsyncClient, ledger: JobLedger, job_id: str, *, until: float) -> None:
    """Read the job every JOB_POLL_S until it is final or the clock (time.perf_counter) passes `until`."""
    while not ledger.is_final(job_id) and (left := until - time.perf_counter()) > 0:
        await asyncio.sleep(min(JOB_POLL_S, left))
        await _read_job(client, ledger, job_id)


async def _drain_jobs(client: httpx.AsyncClient, ledger: JobLedger, *, limit_s: float) -> float:
    """Read every job not yet final, one after another every JOB_POLL_S, until none is left or `limit_s` has
    passed; returns the seconds waited."""
    began = time.perf_counter()
    while (pending := ledger.unfinished()) and time.perf_counter() - began < limit_s:
        await asyncio.sleep(JOB_POLL_S)
        for job_id in pending:
            await _read_job(client, ledger, job_id)
    return time.perf_counter() - began


async def soak(
    url: str,
    *,
    duration_s: float,
    concurrency: int,
    api_key: str | None = None,
    seed: int = 0,
    timeout_s: float = 300.0,
    job_share: float = JOB_SHARE,
    drain_s: float = DRAIN_S,
) -> SoakReport:
    """Keep `concurrency` requests in flight for `duration_s` seconds (the benchmarks' closed loop: each worker waits
    for its answer, and backs off on 429 and 503), each worker drawing its own mix of routes from `seed`.

    A share `job_share` of the requests is submitted as jobs; a worker whose job was accepted (202) waits for it to
    become final before its next request, reading it every JOB_POLL_S. Jobs still not final when the traffic ends are
    waited for up to `drain_s` seconds more."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        models = response.json()["data"]
        if not models:
            raise RuntimeError(f"{url} serves no models")
        routes = _routes(models)
        rss_start = await _resident_memory(client)
        requests = lambda worker: functools.partial(  # noqa: E731
            _pick, routes, random.Random(seed * 1000 + worker), job_share
        )
        ledger = JobLedger()
        traffic_ends = time.perf_counter() + duration_s

        async def wait_for_accepted_job(result: RequestResult, content: bytes) -> None:
            if result.path == JOBS_PATH and result.status == 202:
                job_id = json.loads(content)["id"]
                ledger.accept(job_id)
                await _wait_for_job(client, ledger, job_id, until=traffic_ends)

        results, elapsed = await closed_loop(
            url,
            requests,
            concurrency=concurrency,
            duration_s=duration_s,
            max_requests=2**62,
            timeout_s=timeout_s,
            headers=headers,
            backoff_max_s=MAX_BACKOFF_S,
            after_answer=wait_for_accepted_job,
        )
        rss_end = await _resident_memory(client)
        job_drain_s = await _drain_jobs(client, ledger, limit_s=drain_s)

    statuses: dict[str, Counter] = {}
    for r in results:
        if r.status:
            statuses.setdefault(r.path, Counter())[str(r.status)] += 1
    by_status: Counter = Counter()
    for counts in statuses.values():
        by_status.update(counts)
    errors = Counter(r.error for r in results if not r.status)
    latencies: dict[str, list[float]] = {}
    for r in results:
        if r.status == 200:
            latencies.setdefault(r.path, []).append(r.latency_s)
    return SoakReport(
        url=url,
        duration_s=elapsed,
        concurrency=concurrency,
        requests=len(results),
        by_status=dict(by_status),
        by_endpoint={e: dict(c) for e, c in statuses.items()},
        errors=dict(errors),
        latency_ms={e: latency_summary(v) for e, v in latencies.items()},
        rss_start_bytes=rss_start,
        rss_end_bytes=rss_end,
        models=[m["name"] for m in models],
        job_share=job_share,
        jobs=ledger.tally(),
        job_drain_s=job_drain_s,
        unfinished_jobs=ledger.unfinished(),
    )


def run_soak(url: str, *, minutes: float, **options) -> SoakReport:
    """The `softdimo soak` command's work: run the soak (`options` are soak's) and return its report."""
    return asyncio.run(soak(url.rstrip("/"), duration_s=minutes * 60, **options))


def write_report(report: SoakReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.as_dict(), f, indent=2)
        f.write("\n")
