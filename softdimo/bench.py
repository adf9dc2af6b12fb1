"""Offline model benchmarks (forward + decode throughput, FLOPs, matmul peak, TTEO step cost) and the pieces
every benchmark shares: timing medians, percentiles, machine description and markdown tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from softdimo import shapes
from softdimo.bundle import read_bundle
from softdimo.pipeline import OneStepPipeline, TeacherPipeline, load_pipeline

EXAMPLE_PROMPT = "a red circle"
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
WARMUP_CALLS = 2  # untimed calls before each timed measurement: first-call allocations and kernel selection


# ---------------------------------------------------------------- shared pieces


class BenchError(ValueError):
    """A benchmark that cannot run as asked (a wrong bundle kind, a missing device, a server that never got ready)."""


def check_options(*, positive: dict, non_negative: dict | None = None) -> None:
    """Options by their flag names (underscores for dashes); a value may be a number, a sequence of them, or None (unset)."""
    for bound, values in ((0, positive), (-1, non_negative or {})):
        for name, value in values.items():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None and v <= bound:
                    raise BenchError(f"--{name.replace('_', '-')} must be {'positive' if bound == 0 else '0 or more'}, got {v}")


def resolve_device(name: str) -> torch.device:
    from softdimo.device import DeviceError
    from softdimo.device import resolve_device as resolve

    try:
        return resolve(name)
    except DeviceError as exc:
        raise BenchError(str(exc)) from exc


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after `warmup` untimed calls; the device is synchronised around each."""
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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, command: str) -> dict:
    """What a reader needs to compare two runs: hardware, software, device, date and the command."""
    info = {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
    }  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def command_line(words: Sequence[str], options: Sequence[tuple[str, object]]) -> str:
    """`softdimo bench …` with every option spelled out (defaults included), so rerunning it repeats the run."""
    parts = list(words)
    for flag, value in options:
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def machine_header(machine: dict) -> str:
    """The two lines above every table: where and how the numbers were measured."""
    hardware = machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_count']} CPUs"
    return (
        f"**machine** {hardware} · torch {machine['torch']} ({machine['torch_threads']} threads) · "
        f"device {machine['device']} · {machine['date']}  \n**command** `{machine['command']}`"
    )


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------- what the model is asked


def example_inputs(pipeline: TeacherPipeline | OneStepPipeline, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """A batch of one fixed request: conditioning (B, ...) and the text a reward reads. Cost does not depend on content."""
    conditioner = pipeline.conditioner
    if conditioner.conditioning == "text":
        return conditioner.encode_prompts([EXAMPLE_PROMPT] * batch_size), [EXAMPLE_PROMPT] * batch_size
    return conditioner.encode_labels([0] * batch_size), [shapes.class_prompt(0).text()] * batch_size


def generate_call(pipeline, batch_size: int, steps: int | None = None) -> Callable[[], np.ndarray]:
    """One batch through the pipeline as the server runs it: noise, forward (or sampling), tokens, decode, uint8."""
    condition, _ = example_inputs(pipeline, batch_size)
    seeds = list(range(batch_size))
    return lambda: pipeline.generate(condition, seeds, steps)


def refine_call(pipeline: OneStepPipeline, batch_size: int, steps: int) -> Callable[[], object]:
    """One TTEO batch with the bundle's settings at `steps` gradient steps (best_of = 1, the default request)."""
    if not isinstance(pipeline, OneStepPipeline) or not pipeline.rewards:
        raise BenchError("TTEO needs a one-step bundle with a reward")
    condition, texts = example_inputs(pipeline, batch_size)
    settings = replace(pipeline.tteo, steps=steps, best_of=1)
    candidates = [[seed] for seed in range(batch_size)]
    return lambda: pipeline.refine(condition, texts, candidates, settings)


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call, counted by torch's FLOP counter (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, *, size: int, repeats: int = 5) -> float:
    """This machine's measured matmul rate in FLOP/s: square `size` matmuls at the current thread count."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 1 if device.type == "cpu" else 20  # one GPU matmul is too short to time on its own
    seconds = median_seconds(lambda: [a @ b for _ in range(inner)], repeats=repeats, warmup=1, device=device)
    return 2 * size**3 * inner / seconds


def default_matmul_size(device: torch.device) -> int:
    return 2048 if device.type == "cpu" else 8192


# ---------------------------------------------------------------- bench offline


@dataclass(frozen=True)
class OfflineBench:
    model: str
    device: str = "auto"
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    steps: tuple[int, ...] | None = None  # sampling steps for masked-diffusion bundles; None: the bundle's own
    repeats: int = 5  # timed calls per batch size; the median is reported
    warmup: int = WARMUP_CALLS
    matmul_size: int | None = None  # None: 2048 on CPU, 8192 on CUDA

    def __post_init__(self):
        check_options(
            positive={
                "repeats": self.repeats, "batch_sizes": self.batch_sizes, "steps": self.steps, "matmul_size": self.matmul_size,
            },  # fmt: skip
            non_negative={"warmup": self.warmup},
        )


def run_offline(config: OfflineBench, command: str) -> dict:
    """Images/s of forward + decode per batch size, FLOPs per image, achieved FLOP/s and the matmul peak."""
    device = resolve_device(config.device)
    bundle = read_bundle(config.model)
    pipeline = load_pipeline(config.model, device)
    kind = bundle.config["kind"]
    if kind == "masked-diffusion":
        steps_list = list(config.steps or [pipeline.sampler.steps])
    elif config.steps:
        raise BenchError("--steps applies to masked-diffusion bundles; this one is one-step")
    else:
        steps_list = [None]
    size = config.matmul_size or default_matmul_size(device)
    peak = {"fp32": matmul_peak(device, torch.float32, size=size)}
    if device.type == "cuda":
        peak["bf16"] = matmul_peak(device, torch.bfloat16, size=size)
    rows = []
    for steps in steps_list:
        flops = count_flops(generate_call(pipeline, 1, steps))
        for batch_size in config.batch_sizes:
            call = generate_call(pipeline, batch_size, steps)
            seconds = median_seconds(call, repeats=config.repeats, warmup=config.warmup, device=device)
            images_per_s = batch_size / seconds
            rows.append({
                "steps": steps, "batch_size": batch_size, "seconds_per_batch": seconds, "images_per_s": images_per_s,
                "flops_per_image": flops, "achieved_flops": flops * images_per_s,
                "fraction_of_peak": flops * images_per_s / peak["fp32"],
            })  # fmt: skip
    return {
        "bench": "offline", "machine": machine_info(device, command), "config": asdict(config),
        "model": {"path": str(config.model), "name": bundle.config["name"], "kind": kind},
        "matmul": {"size": size, "threads": torch.get_num_threads(), "peak_flops": peak},
        "rows": rows,
    }  # fmt: skip


def offline_table(result: dict) -> str:
    peak = result["matmul"]["peak_flops"]
    peaks = ", ".join(f"{name} {value / 1e9:,.1f} GFLOP/s" for name, value in peak.items())
    model = result["model"]
    rows = [
        [
            r["steps"] if r["steps"] is not None else 1, r["batch_size"], r["seconds_per_batch"] * 1000, r["images_per_s"],
            r["flops_per_image"] / 1e6, r["achieved_flops"] / 1e9, 100 * r["fraction_of_peak"],
        ]
        for r in result["rows"]
    ]  # fmt: skip
    table = markdown_table(
        ["steps", "batch", "ms / batch", "images/s", "MFLOP / image", "GFLOP/s", "% of fp32 peak"], rows
    )
    return (
        f"{machine_header(result['machine'])}\n\n"
        f"Offline forward + decode of `{model['name']}` ({model['kind']}), median of {result['config']['repeats']} "
        f"after {result['config']['warmup']} warm-up calls. Measured matmul peak "
        f"({result['matmul']['size']}×{result['matmul']['size']}, {result['matmul']['threads']} threads): {peaks}.\n\n"
        f"{table}\n"
    )


# ---------------------------------------------------------------- TTEO step cost (used by `bench refine`)


def tteo_step_cost(pipeline: OneStepPipeline, *, steps: int, batch_size: int, repeats: int, warmup: int) -> dict:
    """Seconds per TTEO step against one forward + decode at the same batch size.

    A /refine call with K steps also pays for the candidate pass and the final decode; timing it at K and at 0
    steps and dividing the difference by K leaves the cost of the steps alone."""
    if steps < 1:
        raise BenchError("TTEO steps must be at least 1")
    device = pipeline.device
    forward_s = median_seconds(generate_call(pipeline, batch_size), repeats=repeats, warmup=warmup, device=device)
    refine_s = median_seconds(refine_call(pipeline, batch_size, steps), repeats=repeats, warmup=warmup, device=device)
    zero_s = median_seconds(refine_call(pipeline, batch_size, 0), repeats=repeats, warmup=warmup, device=device)
    step_s = (refine_s - zero_s) / steps
    return {
        "tteo_steps": steps, "batch_size": batch_size, "forward_s": forward_s, "refine_s": refine_s,
        "refine_zero_steps_s": zero_s, "step_s": step_s, "step_over_forward": step_s / forward_s,
    }  # fmt: skip
