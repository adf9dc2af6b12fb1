"""The offline benchmark (`softdimo bench offline`): throughput, FLOPs against the matmul peak, a TTEO step's cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from softdimo.bench_run import (
    DEFAULT_BATCH_SIZES,
    BenchError,
    RuntimeOptions,
    check_options,
    machine_header,
    machine_info,
    runtime_words,
)
from softdimo.bundle import read_bundle
from softdimo.device import resolve_device
from softdimo.generator import GeneratorSettings, OneStepGenerator
from softdimo.pipeline import OneStepPipeline, load_pipeline
from softdimo.runtime import Runtime, RuntimeSettings
from softdimo.seeding import ImageNoise
from softdimo.tables import markdown_table
from softdimo.timing import WARMUP_CALLS, compare_rounds, interleaved, measure, median_seconds, ratio_range
from softdimo.transformer import MaskedTransformer, TransformerConfig
from softdimo.warmup import example_inputs


# ---------------------------------------------------------------- what the model is asked


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


# ---------------------------------------------------------------- what offline runs: a bundle, or a network at scale


# Networks at the size of published models, with random weights, for `bench offline --config`: the generator's one
# forward pass and token draw, without a decoder (their tokenizers' decoders are not part of this project).
SCALES = {
    # MaskGen-L (reference/paper.md 3.4): width 1024, depth 16, heads 16 over 128 tokens of an 8192-code VQ, 77 CLIP ids
    "maskgen-l": TransformerConfig(
        codebook_size=8192, tokens=128, width=1024, depth=16, heads=16, text_vocab=49408, text_length=77
    ),
    # MaskGIT (reference/paper.md 3.3): hidden 768, depth 24, heads 16 over 16x16 tokens of a 1024-code VQGAN,
    # 1000 classes
    "maskgit": TransformerConfig(
        codebook_size=1024, tokens=256, width=768, depth=24, heads=16, text_vocab=0, num_classes=1000
    ),
}
# Dense bf16 tensor-core peaks from the vendors' datasheets, in FLOP/s, by a part of the name torch gives the device
# (first match wins); any other device takes --peak-tflops.
STATED_BF16_PEAKS = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("A100", 312.0e12),
    ("L40S", 362.1e12),
    ("L4", 121.0e12),
)


def stated_bf16_peak(device: torch.device, tflops: float | None = None) -> float | None:
    """The device's stated dense bf16 peak in FLOP/s: `tflops` when given, else the datasheet's for a known GPU."""
    if tflops is not None:
        return tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in STATED_BF16_PEAKS if part in name), None)


@dataclass
class NetworkForward:
    """A generator at scale, run like a pipeline: conditioning and one seed per image in, sampled tokens (B, N) out."""

    generator: OneStepGenerator

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def generate(self, condition: torch.Tensor, seeds: Sequence[int], steps: int | None = None) -> torch.Tensor:
        return self.generator.generate_tokens(condition, ImageNoise(seeds, self.device))


def network_at_scale(name: str, device: torch.device, seed: int = 0) -> NetworkForward:
    if name not in SCALES:
        raise BenchError(f"unknown --config {name!r}; configs: {', '.join(SCALES)}")
    torch.manual_seed(seed)
    model = MaskedTransformer(SCALES[name]).to(device).eval().requires_grad_(False)
    return NetworkForward(OneStepGenerator(model, GeneratorSettings()))


def _scale_inputs(forward: NetworkForward, batch_size: int) -> torch.Tensor:
    cfg = forward.generator.cfg
    if cfg.text_vocab:
        return torch.randint(
            1, cfg.text_vocab, (batch_size, cfg.text_length), generator=torch.Generator().manual_seed(0)
        )
    return torch.zeros(batch_size, dtype=torch.long)


@dataclass
class OfflineArm:
    """One side of `bench offline`: what runs (a bundle, or a network at scale) and how (its runtime settings)."""

    label: str
    name: str
    kind: str  # "one-step", "masked-diffusion", or "network" (a scale config: forward and token draw only)
    source: str  # the bundle folder or the config name
    pipeline: object
    runtime: Runtime
    default_steps: int | None  # a teacher's own sampling steps

    def call(self, batch_size: int, steps: int | None, runtime: Runtime | None = None) -> Callable[[], object]:
        """One batch as the server runs it, through the runtime: conditioning, noise, forward (or sampling), decode."""
        if self.kind == "network":
            condition = _scale_inputs(self.pipeline, batch_size)
        else:
            condition, _ = example_inputs(self.pipeline, batch_size)
        seeds = list(range(batch_size))
        steps = steps if self.kind == "masked-diffusion" else None
        runtime = runtime or self.runtime
        return lambda: runtime.generate(self.pipeline, condition, seeds, steps)

    @property
    def decode_chunk(self) -> int:
        """Images the decoder runs at once: it pads a smaller batch to this (so a seed's pixels never depend on it)."""
        return getattr(getattr(self.pipeline, "tokenizer", None), "decode_chunk", None) or 1

    def flops(self, steps: int | None) -> int:
        """FLOPs of one image: the network's, whatever precision or compiler runs them, so counted on the plain path,
        over one decode chunk of images, so that the decoder's padding of a smaller batch is not counted as work."""
        n = self.decode_chunk
        return count_flops(self.call(n, steps, Runtime())) // n

    def decoder_flops(self) -> int | None:
        """FLOPs of decoding one image's tokens, the tokenizer decoder's share of `flops`; None without a decoder."""
        grid = getattr(getattr(getattr(self.pipeline, "tokenizer", None), "cfg", None), "grid", None)
        if self.kind == "network" or grid is None:
            return None
        n = self.decode_chunk
        tokens = torch.zeros(n, grid * grid, dtype=torch.long, device=self.pipeline.device)
        with torch.inference_mode():
            return count_flops(lambda: self.pipeline.tokenizer.decode_indices(tokens)) // n

    def describe(self) -> dict:
        runtime = self.runtime.settings.to_dict()
        return {
            "label": self.label,
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "runtime": runtime,
            "decoder_flops_per_image": self.decoder_flops(),
        }


def load_arm(
    label: str,
    *,
    model: str | None,
    config: str | None,
    runtime: RuntimeSettings,
    device: torch.device,
    max_batch_size: int,
) -> OfflineArm:
    run = Runtime(runtime, max_batch_size=max_batch_size)
    if config is not None:
        return OfflineArm(label, config, "network", config, network_at_scale(config, device), run, None)
    bundle = read_bundle(model)
    pipeline = load_pipeline(model, device)
    kind = bundle.config["kind"]
    steps = pipeline.sampler.steps if kind == "masked-diffusion" else None
    return OfflineArm(label, bundle.config["name"], kind, str(model), pipeline, run, steps)


# ---------------------------------------------------------------- bench offline


@dataclass(frozen=True, kw_only=True)
class OfflineBench(RuntimeOptions):
    model: tuple[str, ...] = ()  # one bundle folder, or two to compare
    config: tuple[str, ...] = ()  # instead of bundles: one or two SCALES names (random weights, no decoder)
    device: str = "auto"
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    steps: tuple[int, ...] | None = None  # sampling steps for masked-diffusion bundles; None: the bundle's own
    repeats: int = 5  # timed calls per measurement; the median is reported
    warmup: int = WARMUP_CALLS
    matmul_size: int | None = None  # None: 2048 on CPU, 8192 on CUDA
    peak_tflops: float | None = None  # the device's dense bf16 peak; None: the datasheet's for a known GPU

    def __post_init__(self):
        super().__post_init__()
        for name in ("model", "config"):  # one folder may be given as a string
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        check_options(
            positive={
                "repeats": self.repeats,
                "batch_sizes": self.batch_sizes,
                "steps": self.steps,
                "matmul_size": self.matmul_size,
                "peak_tflops": self.peak_tflops,
            },
            non_negative={"warmup": self.warmup},
        )
        if bool(self.model) == bool(self.config):
            raise BenchError("give --model (bundle folders) or --config (a network at scale), one of them")
        self.offline_arms()  # one value or two for each option

    def offline_arms(self) -> list[dict]:
        return self.arms({"model": self.model or (None,), "config": self.config or (None,)})


def run_offline(config: OfflineBench, command: str) -> dict:
    """One arm: images/s per batch size, FLOPs per image, achieved FLOP/s against the measured matmul peak (and the
    stated bf16 peak on a known GPU). Two arms: the same, timed in interleaved rounds, with B / A and its range."""
    device = resolve_device(config.device)
    arms = [
        load_arm(label, **spec, device=device, max_batch_size=max(config.batch_sizes))
        for label, spec in zip("AB", config.offline_arms())
    ]
    if config.steps and not any(arm.kind == "masked-diffusion" for arm in arms):
        raise BenchError("--steps applies to masked-diffusion bundles; this one is one-step")
    if config.steps and len(arms) == 2 and len(config.steps) > 1:
        raise BenchError("a comparison runs at one --steps value")
    size = config.matmul_size or default_matmul_size(device)
    peak = {"fp32": matmul_peak(device, torch.float32, size=size)}
    if device.type == "cuda" or any(arm.runtime.settings.precision == "bf16" for arm in arms):
        peak["bf16"] = matmul_peak(device, torch.bfloat16, size=size)
    stated = stated_bf16_peak(device, config.peak_tflops)
    result = {
        "bench": "offline",
        "machine": machine_info(device, command),
        "config": asdict(config),
        "arms": [arm.describe() for arm in arms],
        "matmul": {
            "size": size,
            "threads": torch.get_num_threads(),
            "peak_flops": peak,
            "stated_bf16_peak_flops": stated,
        },
    }
    if len(arms) == 1:
        arm = arms[0]
        result["model"] = {"path": arm.source, "name": arm.name, "kind": arm.kind}
        result["rows"] = _offline_rows(arm, config, peak=peak, stated=stated, device=device)
    else:
        result["comparison"] = _offline_comparison(arms, config, peak=peak, stated=stated, device=device)
    return result


def _steps_values(arm: OfflineArm, config: OfflineBench) -> list[int | None]:
    if arm.kind != "masked-diffusion":
        return [None]
    return list(config.steps or [arm.default_steps])


def _rates(
    arm: OfflineArm,
    *,
    steps: int | None,
    flops: int,
    peak: dict,
    stated: float | None,
    batch_size: int,
    seconds: float,
) -> dict:
    images_per_s = batch_size / seconds
    achieved = flops * images_per_s
    precision = arm.runtime.settings.precision
    return {
        "steps": steps,
        "batch_size": batch_size,
        "seconds_per_batch": seconds,
        "images_per_s": images_per_s,
        "flops_per_image": flops,
        "achieved_flops": achieved,
        "fraction_of_peak": achieved / peak.get(precision, peak["fp32"]),
        "fraction_of_stated_bf16_peak": achieved / stated if stated else None,
    }


def _offline_rows(
    arm: OfflineArm, config: OfflineBench, *, peak: dict, stated: float | None, device: torch.device
) -> list[dict]:
    rows = []
    for steps in _steps_values(arm, config):
        flops = arm.flops(steps)
        for batch_size in config.batch_sizes:
            seconds = median_seconds(
                arm.call(batch_size, steps), repeats=config.repeats, warmup=config.warmup, device=device
            )
            rows.append(
                _rates(arm, steps=steps, flops=flops, peak=peak, stated=stated, batch_size=batch_size, seconds=seconds)
            )
    return rows


def _offline_comparison(
    arms: list[OfflineArm],
    config: OfflineBench,
    *,
    peak: dict,
    stated: float | None,
    device: torch.device,
) -> list[dict]:
    steps = {arm.label: _steps_values(arm, config)[0] for arm in arms}
    flops = {arm.label: arm.flops(steps[arm.label]) for arm in arms}
    rows = []
    for batch_size in config.batch_sizes:
        calls = [arm.call(batch_size, steps[arm.label]) for arm in arms]
        for call in calls:  # warm both before either is timed
            measure(call, repeats=1, warmup=config.warmup, device=device)
        measures = [
            lambda call=call: batch_size / median_seconds(call, repeats=config.repeats, warmup=0, device=device)
            for call in calls
        ]
        a, b = interleaved(measures, rounds=config.rounds)
        stats = compare_rounds(a, b)
        row = {"batch_size": batch_size, **stats, "rounds_images_per_s": {"A": a, "B": b}, "arms": {}}
        for arm, rate in zip(arms, (stats["a"], stats["b"])):
            row["arms"][arm.label] = _rates(
                arm,
                steps=steps[arm.label],
                flops=flops[arm.label],
                peak=peak,
                stated=stated,
                batch_size=batch_size,
                seconds=batch_size / rate,
            )
        rows.append(row)
    return rows


def _arm_line(arm: dict) -> str:
    if arm["kind"] == "network":
        return f"`{arm['name']}` (random weights, forward and token draw, no decoder; {runtime_words(arm['runtime'])})"
    return f"`{arm['name']}` from `{arm['source']}` ({arm['kind']}; {runtime_words(arm['runtime'])})"


def offline_table(result: dict) -> str:
    matmul = result["matmul"]
    peaks = ", ".join(f"{name} {value / 1e9:,.1f} GFLOP/s" for name, value in matmul["peak_flops"].items())
    stated = matmul.get("stated_bf16_peak_flops")
    if stated:
        peaks += f"; stated dense bf16 peak {stated / 1e12:,.1f} TFLOP/s"
    cfg = result["config"]
    header = (
        f"{machine_header(result['machine'])}\n\n"
        f"Measured matmul peak ({matmul['size']}×{matmul['size']}, {matmul['threads']} threads): {peaks}."
    )
    stated_column = ["% of stated bf16 peak"] if stated else []
    if "comparison" in result:
        a, b = result["arms"]
        rows = [
            [
                r["batch_size"],
                r["a"],
                r["b"],
                r["ratio"],
                ratio_range(r),
                100 * r["arms"]["A"]["fraction_of_peak"],
                100 * r["arms"]["B"]["fraction_of_peak"],
            ]
            for r in result["comparison"]
        ]
        table = markdown_table(
            ["batch", "A images/s", "B images/s", "B / A", "B / A range", "A % of peak", "B % of peak"], rows
        )
        flops = {label: result["comparison"][0]["arms"][label]["flops_per_image"] / 1e6 for label in "AB"}
        return (
            f"{header}\n\nA: {_arm_line(a)}, {flops['A']:,.0f} MFLOP / image. "
            f"B: {_arm_line(b)}, {flops['B']:,.0f} MFLOP / image. "
            f"Each batch size: {cfg['rounds']} rounds per arm, "
            f"interleaved A, B, B, A, …, each the median of {cfg['repeats']} calls "
            f"after {cfg['warmup']} warm-up calls; "
            f"images/s is each arm's median round, B / A the median of the rounds' ratios "
            f"and its range their least and greatest.\n\n{table}\n"
        )
    arm = result["arms"][0]
    rows = [
        [
            r["steps"] if r["steps"] is not None else 1,
            r["batch_size"],
            r["seconds_per_batch"] * 1000,
            r["images_per_s"],
            r["flops_per_image"] / 1e6,
            r["achieved_flops"] / 1e9,
            100 * r["fraction_of_peak"],
            *([100 * r["fraction_of_stated_bf16_peak"]] if stated else []),
        ]
        for r in result["rows"]
    ]
    precision = arm["runtime"]["precision"]
    table = markdown_table(
        [
            "steps",
            "batch",
            "ms / batch",
            "images/s",
            "MFLOP / image",
            "GFLOP/s",
            f"% of {precision} peak",
            *stated_column,
        ],
        rows,
    )
    decoder = arm.get("decoder_flops_per_image")
    share = ""
    if decoder:
        total = result["rows"][0]["flops_per_image"]
        share = (
            f" Of one image's {total / 1e6:,.0f} MFLOP, "
            f"the tokenizer decoder's are {decoder / 1e6:,.1f} ({100 * decoder / total:.1f} %)."
        )
    return (
        f"{header}\n\nOffline {'forward' if arm['kind'] == 'network' else 'forward + decode'} of {_arm_line(arm)}, "
        f"median of {cfg['repeats']} after {cfg['warmup']} warm-up calls.{share}\n\n{table}\n"
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
        "tteo_steps": steps,
        "batch_size": batch_size,
        "forward_s": forward_s,
        "refine_s": refine_s,
        "refine_zero_steps_s": zero_s,
        "step_s": step_s,
        "step_over_forward": step_s / forward_s,
    }
