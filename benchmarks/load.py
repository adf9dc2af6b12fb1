"""The closed-loop load: workers each sending a request and awaiting its answer, made by this project's client or by
hey (benchmarks/hey.py), and the summary of a load."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, Sequence

import httpx

from benchmarks.hey import HeyAnswer, run_hey
from benchmarks.load_client import Connection, LoadClientError
from benchmarks.server_metrics import Counters, batches, changes, server_counters, stages
from softdimo.timing import latency_summary
from softdimo.warmup import EXAMPLE_PROMPT


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


BUILTIN = "builtin"  # this project's client: closed_loop below, on benchmarks/load_client.py
HEY = "hey"  # the external hey, which never sees the server's `timing` and lists no request that went unanswered
LOAD_GENERATORS = {BUILTIN: "closed loop of `benchmarks/load.py`", HEY: "closed loop of `hey` (external)"}


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
    generator: str = BUILTIN  # a key of LOAD_GENERATORS; hey runs each round for its duration, whatever max_requests


WorkerRequests = Callable[[int], Callable[[], tuple[str, dict]]]  # worker index -> that worker's next (path, body)
AfterAnswer = Callable[[RequestResult, bytes], Awaitable[None]]  # a request's result and the body answered


async def closed_loop(
    url: str,
    requests: WorkerRequests,
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    backoff_max_s: float = 0.0,
    after_answer: AfterAnswer | None = None,
) -> tuple[list[RequestResult], float]:
    """One round of `concurrency` workers, each sending its next request and waiting for the answer; returns every
    request's result and the round's wall time. Each worker keeps its own connection. With `backoff_max_s`, a worker
    answered 429 or 503 pauses for Retry-After (1 s without one), at most that long, as a polite client would. With
    `after_answer`, a worker awaits it after each HTTP answer before its next request (the soak waits there for the
    job a 202 accepted)."""
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
                content = b""
                try:
                    status, content = await connection.post_json(path, body, timeout_s=timeout_s)
                    result = RequestResult(time.perf_counter() - sent, status, path=path)
                    if status == 200:
                        payload = json.loads(content)
                        result.images = len(payload["data"])
                        if "timing" in payload:  # a peer server answers without the contract's timing
                            result.queue_s, result.compute_s = (
                                payload["timing"]["queue_s"],
                                payload["timing"]["compute_s"],
                            )
                except (
                    LoadClientError,
                    TimeoutError,
                    ValueError,
                    KeyError,
                ) as exc:  # no answer, or a 200 without the contract's body
                    result = RequestResult(time.perf_counter() - sent, 0, path=path, error=type(exc).__name__)
                results.append(result)
                if after_answer is not None and result.status:
                    await after_answer(result, content)
                if backoff_max_s and result.status in (429, 503):
                    pause = connection.retry_after if connection.retry_after is not None else 1.0
                    await asyncio.sleep(min(pause, backoff_max_s, max(0.0, deadline - time.perf_counter())))
        finally:
            connection.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return results, time.perf_counter() - began


def fixed_requests(target: Target, seeds: Iterator[int]) -> WorkerRequests:
    """Every worker sends the target's request, each with the next seed."""
    return lambda worker: lambda: (target.path, target.request(next(seeds)))


async def run_load(url: str, target: Target, load: Load, server_metrics: bool = True) -> dict:
    """Warm up, then run `load.rounds` measured rounds; the summary covers the measured rounds only. Batch sizes and
    the requests' stages come from the server's /metrics (`server_metrics`; a peer server has none)."""
    seeds = itertools.count()
    async with httpx.AsyncClient(base_url=url, timeout=load.timeout_s, trust_env=False) as client:

        async def counters() -> Counters:
            if not server_metrics:
                return {}
            return await server_counters(client, endpoint=target.path, model=target.model)

        if load.warmup_s > 0:
            await load_round(url, target, load, seeds, duration_s=load.warmup_s)
        before = await counters()
        samples, walls = [], []
        for _ in range(load.rounds):
            round_samples, wall = await load_round(url, target, load, seeds, duration_s=load.duration_s)
            samples += round_samples
            walls.append(wall)
        changed = changes(before, await counters())
    summary = summarize(samples, walls, concurrency=load.concurrency, batches=batches(changed))
    if load.generator == HEY:
        summary["errors"] = None  # not known: hey lists only the requests that got an HTTP answer
    return {**summary, "load_generator": load.generator, "stages": stages(changed) if server_metrics else None}


async def load_round(
    url: str,
    target: Target,
    load: Load,
    seeds: Iterator[int],
    *,
    duration_s: float,
) -> tuple[list[RequestResult], float]:
    """One round of `load` for `duration_s` by its generator: every request's result, and the round's wall time.
    The builtin client gives each request the next of `seeds`; hey sends the target's body as it is, so the server
    draws each request's seed."""
    if load.generator == HEY:
        answers, wall = await run_hey(
            url, target.path, target.body, concurrency=load.concurrency, duration_s=duration_s, timeout_s=load.timeout_s
        )
        return hey_results(answers, target), wall
    return await closed_loop(
        url,
        fixed_requests(target, seeds),
        concurrency=load.concurrency,
        duration_s=duration_s,
        max_requests=load.max_requests,
        timeout_s=load.timeout_s,
    )


def hey_results(answers: Sequence[HeyAnswer], target: Target) -> list[RequestResult]:
    """hey's answers to requests for `target` as results; hey reads no body: an answer 200 has the images asked."""
    images = target.body["n"]
    return [
        RequestResult(a.latency_s, a.status, images=images if a.status == 200 else 0, path=target.path) for a in answers
    ]


def summarize(
    samples: Sequence[RequestResult], walls: Sequence[float], *, concurrency: int, batches: tuple[float, float]
) -> dict:
    """Throughput over the measured wall time, client-side latency percentiles of answered requests, error counts."""
    ok = [s for s in samples if s.status == 200]
    images = sum(s.images for s in ok)
    elapsed = sum(walls)
    images_sum, batch_count = batches
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "images": images,
        "elapsed_s": elapsed,
        "round_s": list(walls),
        "images_per_s": images / elapsed if elapsed > 0 else 0.0,
        "latency_ms": latency_summary([s.latency_s for s in ok]),
        "queue_ms": latency_summary([s.queue_s for s in ok if s.queue_s is not None])["mean"],
        "compute_ms": latency_summary([s.compute_s for s in ok if s.compute_s is not None])["mean"],
        "batches": int(batch_count),
        "mean_batch_size": images_sum / batch_count if batch_count else None,
        "status_429": sum(s.status == 429 for s in samples),
        "status_5xx": sum(500 <= s.status < 600 for s in samples),
        "errors": sum(s.status == 0 for s in samples),
        "other_status": sum(s.status not in (0, 200, 429) and not 500 <= s.status < 600 for s in samples),
    }
