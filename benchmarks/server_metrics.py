"""What a softdimo server's /metrics says about the requests of a load: the batches they ran in, and the stages each
spent its time in (softdimo_request_stage_seconds), as changes across the load."""

from __future__ import annotations

import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import REQUEST_STAGES

BATCH_SIZE = "softdimo_batch_size"
REQUEST_STAGE = "softdimo_request_stage_seconds"

Counters = dict[tuple[str, str | None, str | None], float]  # (sample name, stage, le) -> value


async def server_counters(client: httpx.AsyncClient, *, endpoint: str, model: str) -> Counters:
    """The server's softdimo_batch_size samples for `endpoint` and `model`, and its request stage samples for
    `endpoint`, now."""
    found: Counters = {}
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        if family.name == BATCH_SIZE:
            wanted = {"endpoint": endpoint, "model": model}
        elif family.name == REQUEST_STAGE:
            wanted = {"endpoint": endpoint}
        else:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created") and all(sample.labels.get(k) == v for k, v in wanted.items()):
                found[(sample.name, sample.labels.get("stage"), sample.labels.get("le"))] = sample.value
    return found


def changes(before: Counters, after: Counters) -> Counters:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def batches(changed: Counters) -> tuple[float, float]:
    """(images, batches) executed: the change of softdimo_batch_size's sum and count."""
    return changed.get((BATCH_SIZE + "_sum", None, None), 0.0), changed.get((BATCH_SIZE + "_count", None, None), 0.0)


def stages(changed: Counters) -> dict[str, dict]:
    """Each stage's requests observed, seconds in all, and cumulative bucket counts [(upper bound, count), ...]."""
    found = {}
    for stage in REQUEST_STAGES:
        buckets = sorted(
            (float(le), count)
            for (name, of_stage, le), count in changed.items()
            if name == REQUEST_STAGE + "_bucket" and of_stage == stage
        )
        found[stage] = {
            "count": int(changed.get((REQUEST_STAGE + "_count", stage, None), 0)),
            "sum_s": changed.get((REQUEST_STAGE + "_sum", stage, None), 0.0),
            "buckets": buckets,
        }
    return found


def stage_summary(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Each stage over the given rounds' observations: mean and 99th percentile in ms, None where none were made. The
    quantile is read from the histogram's buckets as Prometheus' histogram_quantile reads it: linearly within the
    bucket it falls in, so it is only as fine as the buckets (server/metrics.py STAGE_BUCKETS)."""
    summary = {}
    for stage in REQUEST_STAGES:
        count = sum(r[stage]["count"] for r in rounds)
        seconds = sum(r[stage]["sum_s"] for r in rounds)
        merged: dict[float, float] = {}
        for r in rounds:
            for bound, cumulative in r[stage]["buckets"]:
                merged[bound] = merged.get(bound, 0.0) + cumulative
        quantile = _bucket_quantile(0.99, sorted(merged.items())) if count else None
        summary[stage] = {"mean_ms": seconds / count * 1000 if count else None, "p99_ms": quantile}
    return summary


def _bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile in ms of cumulative buckets ending with +Inf (the largest finite bound when it falls there)."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower * 1000
            share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
            return (lower + (bound - lower) * share) * 1000
        lower, below = bound, cumulative
    return None
