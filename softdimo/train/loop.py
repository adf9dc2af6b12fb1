"""The loop every training stage shares: resumable safetensors checkpoints, progress bar, metrics log."""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from softdimo.train import distributed

CHECKPOINT = "checkpoint.safetensors"


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{name}.{index}.{key}"] = torch.as_tensor(value).clone()
    return tensors, {"param_groups": state["param_groups"], "indices": list(state["state"].keys())}


def _unflatten_optimizer(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    prefix = f"optim.{name}."
    state: dict[int, dict[str, torch.Tensor]] = {int(i): {} for i in meta["indices"]}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, slot = key[len(prefix) :].split(".", 1)
            state[int(index)][slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpointer:
    """Saves and restores modules, optimizers and the step in one safetensors file, written atomically."""

    def __init__(
        self, run_dir: str | os.PathLike, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.modules = modules
        self.optimizers = optimizers

    @property
    def path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def save(self, step: int) -> None:
        tensors = {
            f"model.{m}.{k}": v.detach().cpu().contiguous()
            for m, mod in self.modules.items()
            for k, v in mod.state_dict().items()
        }
        meta = {}
        for name, opt in self.optimizers.items():
            flat, opt_meta = _flatten_optimizer(name, opt)
            tensors.update({k: v.cpu().contiguous() for k, v in flat.items()})
            meta[name] = opt_meta
        tmp = self.path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"step": str(step), "optimizers": json.dumps(meta)})
        os.replace(tmp, self.path)

    def restore(self) -> int:
        """Load the checkpoint if there is one; returns the step to continue from (0 when starting)."""
        if not self.path.exists():
            return 0
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(self.path)
        for m, mod in self.modules.items():
            prefix = f"model.{m}."
            device = next(iter(mod.state_dict().values())).device
            mod.load_state_dict({k[len(prefix) :]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)})
        meta = json.loads(metadata["optimizers"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(_unflatten_optimizer(name, tensors, meta[name]))
        return int(metadata["step"])


EVAL_SEED = 20_000  # the held-out prompts every stage evaluates on in training (softdimo eval uses judge's default)
COVERAGE_PROMPTS = 10  # the first of them, whose layout coverage one-step stages log too (judge.COVERAGE_SEEDS each)


def training_eval_prompts(count: int, kinds) -> list:
    """The `count` held-out prompts of `kinds` that training runs evaluate on."""
    from softdimo import judge

    return judge.held_out_prompts(count, seed=EVAL_SEED, kinds=kinds)


def held_out_metrics(pipeline, prompts) -> dict[str, float]:
    """A pipeline's pass rates on held-out prompts, prompt i drawn with seed i: what stages evaluate in training."""
    from softdimo import judge

    return judge.pass_rates(pipeline.generate_prompts(prompts, seeds=range(len(prompts))), prompts).metrics()


def coverage_metrics(pipeline, prompts) -> dict[str, float]:
    """A pipeline's layout coverage on prompts (judge.coverage), each drawn at judge.COVERAGE_SEEDS seeds."""
    from softdimo import judge, shapes

    seeds = list(range(judge.COVERAGE_SEEDS))
    repeated = [p for p in prompts for _ in seeds]
    data = shapes.render_prompts(repeated, np.random.default_rng(EVAL_SEED))
    return judge.coverage(pipeline.generate_prompts(repeated, seeds * len(prompts)), data, prompts).metrics()


def one_step_metrics(generator, tokenizer, conditioner, prompts) -> dict[str, float]:
    """`held_out_metrics` of a one-step generator in one forward pass, and the coverage of the first
    COVERAGE_PROMPTS prompts."""
    from softdimo.pipeline import OneStepPipeline
    from softdimo.tteo import TTEOSettings

    pipeline = OneStepPipeline(
        generator=generator, tokenizer=tokenizer, conditioner=conditioner, rewards={}, tteo=TTEOSettings()
    )
    return held_out_metrics(pipeline, prompts) | coverage_metrics(pipeline, prompts[:COVERAGE_PROMPTS])


def _time_spent(log_path: Path, step: int) -> float:
    """Seconds of training the log records up to `step` (0 for a new run)."""
    spent = 0.0
    if step and log_path.exists():
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            if record["step"] <= step:
                spent = record["elapsed_s"]
    return spent


@dataclass(frozen=True)
class StageCost:
    """What a stage's training costs on this machine, measured on a few of its steps (`timed`)."""

    setup_s: float  # from the stage's start to its first step (loading inputs, fitting what precedes the loop)
    step_s: float  # one training step
    eval_s: float  # one in-training evaluation
    steps: int
    evaluations: int

    @property
    def total_s(self) -> float:
        return self.setup_s + self.steps * self.step_s + self.evaluations * self.eval_s


class Timed(Exception):
    """Raised by `run` inside `timed`: the stage's measured cost instead of its training."""

    def __init__(self, cost: StageCost):
        super().__init__(f"timed: {cost}")
        self.cost = cost


_timing: contextvars.ContextVar[tuple[int, float] | None] = contextvars.ContextVar("timing", default=None)


@contextlib.contextmanager
def timed(steps: int) -> Iterator[None]:
    """Inside this, `run` times `steps` training steps (after one warm-up step) and one evaluation, then raises
    Timed; the run writes no checkpoint and no log, so a stage's cost is measured without training it."""
    if steps < 1:
        raise ValueError(f"timing needs at least one step, got {steps}")
    token = _timing.set((steps, time.monotonic()))
    try:
        yield
    finally:
        _timing.reset(token)


def _evaluations(steps: int, eval_every: int) -> int:
    """How many times `run` evaluates in a whole run: every `eval_every` steps and after the last."""
    return steps // eval_every + (steps % eval_every != 0) if eval_every else 0


def _measure(
    timing: tuple[int, float],
    modules: dict[str, nn.Module],
    step_fn: Callable[[int], dict[str, float]],
    steps: int,
    eval_fn: Callable[[int], dict[str, float]] | None,
    eval_every: int,
) -> StageCost:
    measured, started = timing
    setup = time.monotonic() - started
    for mod in modules.values():
        mod.train()
    step_fn(0)  # warm-up: first-call allocations and lazy initialisation
    began = time.monotonic()
    for step in range(1, measured + 1):
        step_fn(step)
    step_s = (time.monotonic() - began) / measured
    evaluations = _evaluations(steps, eval_every) if eval_fn is not None else 0
    eval_s = 0.0
    if evaluations:
        for mod in modules.values():
            mod.eval()
        began = time.monotonic()
        with torch.no_grad():
            eval_fn(steps)
        eval_s = time.monotonic() - began
    return StageCost(setup_s=setup, step_s=step_s, eval_s=eval_s, steps=steps, evaluations=evaluations)


def run(
    *,
    run_dir: str | os.PathLike,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    step_fn: Callable[[int], dict[str, float]],
    steps: int,
    checkpoint_every: int = 200,
    eval_fn: Callable[[int], dict[str, float]] | None = None,
    eval_every: int = 0,
    description: str = "train",
) -> None:
    """Run `step_fn(step)` from the last checkpoint up to `steps`, checkpointing and logging metrics as JSON lines.

    Under several processes every rank runs the steps from the same checkpoint; only the first evaluates,
    logs and writes checkpoints. Inside `timed` it measures instead (see there) and raises Timed."""
    timing = _timing.get()
    if timing is not None:
        raise Timed(_measure(timing, modules, step_fn, steps, eval_fn, eval_every))
    main = distributed.current().is_main
    checkpointer = Checkpointer(run_dir, modules, optimizers)
    start = checkpointer.restore()
    distributed.barrier()  # no rank may write the checkpoint before every rank has read it
    log_path = Path(run_dir) / "metrics.jsonl"
    spent = _time_spent(log_path, start)
    log = open(log_path, "a") if main else open(os.devnull, "w")
    if start and main:
        print(f"resuming {description} from step {start} ({checkpointer.path})")
    began = time.monotonic() - spent  # elapsed_s counts training time across resumes
    bar = tqdm(
        range(start, steps),
        initial=start,
        total=steps,
        desc=description,
        mininterval=5,
        dynamic_ncols=True,
        disable=not main,
    )
    for step in bar:
        for mod in modules.values():
            mod.train()
        metrics = step_fn(step)
        done = step + 1
        if main and eval_fn is not None and eval_every and (done % eval_every == 0 or done == steps):
            for mod in modules.values():
                mod.eval()
            with torch.no_grad():
                metrics |= eval_fn(done)
            tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()}, refresh=False)
        log.write(json.dumps({"step": done, "elapsed_s": round(time.monotonic() - began, 1), **metrics}) + "\n")
        log.flush()
        if main and (done % checkpoint_every == 0 or done == steps):
            checkpointer.save(done)
    log.close()
