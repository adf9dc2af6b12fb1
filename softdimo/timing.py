"""Timing on a device: medians of synchronised calls, latency percentiles, two arms compared in interleaved rounds."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch

WARMUP_CALLS = 2  # untimed calls before each timed measurement: first-call allocations and kernel selection


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after `warmup` untimed calls; the device is synchronised around
    each."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - began)
    return samples


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int, device: torch.device) -> float:
    return statistics.median(measure(fn, repeats=repeats, warmup=warmup, device=device))


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 / mean in milliseconds (linear interpolation between order statistics); None when empty."""
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(ms.mean())}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def interleaved(measures: Sequence[Callable[[], float]], *, rounds: int) -> list[list[float]]:
    """Each measure `rounds` times, interleaved A, B, B, A, A, B, …: each arm runs first in half the rounds, so a
    drift in the machine's speed during the run favours neither. Returns every arm's values in round order."""
    values: list[list[float]] = [[] for _ in measures]
    for r in range(rounds):
        order = range(len(measures)) if r % 2 == 0 else reversed(range(len(measures)))
        for i in order:
            values[i].append(measures[i]())
    return values


def compare_rounds(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two arms' rates over the same rounds: each arm's median, and B / A per round as its median and range (None
    when A did nothing in any round)."""
    ratios = [y / x for x, y in zip(a, b) if x > 0]
    spread = (statistics.median(ratios), min(ratios), max(ratios)) if ratios else (None, None, None)
    ratio, least, greatest = spread
    return {
        "a": statistics.median(a),
        "b": statistics.median(b),
        "ratio": ratio,
        "ratio_min": least,
        "ratio_max": greatest,
        "rounds": len(a),
    }


def ratio_range(stats: dict) -> str | None:
    """`least–greatest` of the rounds' B / A, for a table."""
    return None if stats["ratio"] is None else f"{stats['ratio_min']:.3g}–{stats['ratio_max']:.3g}"
