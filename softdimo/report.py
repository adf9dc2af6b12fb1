"""Evaluation reports: a model's images on held-out prompts, judged, with Fréchet distance and placement spread."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from softdimo import judge, shapes
from softdimo.tables import markdown_table
from softdimo.features import FeatureNet
from softdimo.vq import to_tensor

HELD_OUT_SEED = 2026  # prompts no training run draws from
REAL_SEED = 4242  # placements of the reference real images


@dataclass
class Row:
    """One line of an evaluation table."""

    name: str
    rates: judge.PassRates
    frechet: float
    spread: float
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def rates_total(self) -> int:
        return sum(self.rates.counts.values())

    def as_dict(self) -> dict:
        return {
            "name": self.name, "overall": round(self.rates.overall, 4),
            "per_kind": {k: round(v, 4) for k, v in self.rates.per_kind.items()},
            "failures": self.rates.failures, "frechet": round(self.frechet, 3), "spread": round(self.spread, 2),
            "seconds": round(self.seconds, 1), **self.extra,
        }  # fmt: skip


def real_images(prompts: Sequence[shapes.Prompt], seed: int = REAL_SEED, placement: str = "grid") -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [shapes.render(shapes.sample_scene(p, rng, placement)) for p in prompts]


@torch.no_grad()
def feature_vectors(net: FeatureNet, images: Sequence[np.ndarray]) -> np.ndarray:
    out = []
    for i in range(0, len(images), 100):
        out.append(net.features(to_tensor(np.stack(images[i : i + 100])).to(next(net.parameters()).device)).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


class Evaluator:
    """Judges images for a fixed prompt set and compares their features with real images of the same prompts."""

    def __init__(self, prompts: Sequence[shapes.Prompt], features: FeatureNet, placement: str = "grid"):
        self.prompts = list(prompts)
        self.features = features
        self.placement = placement
        reference = real_images(self.prompts, placement=placement)
        self.real_features = feature_vectors(features, reference)
        self.real_spread = judge.placement_spread(reference)

    def row(self, name: str, images: Sequence[np.ndarray], seconds: float = 0.0, **extra) -> Row:
        return Row(
            name=name,
            rates=judge.pass_rates(images, self.prompts),
            frechet=judge.frechet_distance(feature_vectors(self.features, images), self.real_features),
            spread=judge.placement_spread(images),
            seconds=seconds,
            extra=extra,
        )

    def reference_row(self) -> Row:
        return self.row("real images (reference)", real_images(self.prompts, seed=REAL_SEED + 1, placement=self.placement))


@dataclass
class Table:
    """The rows of one model's evaluation, on one prompt set, with the real-image reference last."""

    model: str
    rows: list[Row]
    real_spread: float
    notes: list[str] = field(default_factory=list)  # lines printed under the table

    def markdown(self) -> str:
        return "\n\n".join([results_table(self.rows, self.real_spread), *self.notes])

    def as_dict(self) -> dict:
        return {"model": self.model, "real_spread": round(self.real_spread, 2), "rows": [r.as_dict() for r in self.rows], "notes": self.notes}


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked."""


def evaluate_bundle(
    path, *, features: FeatureNet, prompts: int, steps: Sequence[int] | None, tteo_steps: Sequence[int],
    best_of: Sequence[int], device, grid_dir=None, placement: str = "grid", sampler: dict | None = None,
    tteo: dict | None = None, generator: dict | None = None, runtime=None,
) -> Table:  # fmt: skip
    """Every row for one bundle: reconstructions for a tokenizer; samples at each step count for a teacher;
    one step, TTEO at each step count and best-of-N (alone and with TTEO) for a one-step model.
    `sampler` overrides a teacher's sampler settings, `tteo` a one-step model's TTEO settings (target, lr) and
    `generator` its generator settings (temperature, latent_scale);
    `runtime` (softdimo.runtime.RuntimeSettings) runs the sampled rows as the server would with it (bf16, compiled)."""
    from dataclasses import fields, replace

    from softdimo.bundle import read_bundle
    from softdimo.images import save_grid
    from softdimo.pipeline import OneStepPipeline, load_pipeline, load_tokenizer
    from softdimo.runtime import Runtime, RuntimeSettings

    runtime = runtime or RuntimeSettings()
    run = Runtime(runtime, max_batch_size=50) if runtime != RuntimeSettings() else None

    bundle = read_bundle(path)
    name = bundle.config["name"]
    rows: list[Row] = []
    notes: list[str] = []

    def add(label: str, make: Callable[[], list[np.ndarray]], **extra) -> None:
        images, seconds = timed(make)
        rows.append(evaluator.row(label, images, seconds=seconds, **extra))
        if grid_dir is not None:
            slug = label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "").replace("+", "plus").replace("=", "")
            save_grid(images[:50], grid_dir / f"{slug}.png", columns=10)

    if bundle.config["kind"] == "tokenizer":
        held_out = judge.held_out_prompts(prompts, seed=HELD_OUT_SEED)
        evaluator = Evaluator(held_out, features, placement)
        tokenizer = load_tokenizer(bundle, device)
        originals = real_images(held_out, placement=placement)
        add(f"{name} reconstructions", lambda: reconstructions(tokenizer, originals))
        with torch.no_grad():
            used = tokenizer.encode(to_tensor(np.stack(originals)).to(device)).unique().numel()
        notes.append(f"Codes used by the {len(originals)} held-out images: {used} of {tokenizer.cfg.codebook_size}.")
    else:
        pipeline = load_pipeline(path, device)
        held_out = judge.held_out_prompts(prompts, seed=HELD_OUT_SEED, kinds=pipeline.conditioner.kinds)
        evaluator = Evaluator(held_out, features, placement)
        seeds = list(range(len(held_out)))
        if isinstance(pipeline, OneStepPipeline):
            changes = [(pipeline, "tteo", tteo), (pipeline.generator, "settings", generator)]
        else:
            changes = [(pipeline, "sampler", sampler)]
        for owner, attribute, overrides in changes:
            if not overrides:
                continue
            settings = getattr(owner, attribute)
            known = [f.name for f in fields(settings)]
            if unknown := sorted(set(overrides) - set(known)):
                raise EvaluationError(f"{name}: no {type(settings).__name__} setting {', '.join(unknown)}; settings are {', '.join(known)}")
            setattr(owner, attribute, replace(settings, **overrides))
            name = f"{name} ({', '.join(f'{k} {v}' for k, v in overrides.items())})"
        if run is not None:
            name = f"{name} ({', '.join(f'{k} {v}' for k, v in runtime.to_dict().items() if v != getattr(RuntimeSettings(), k))})"
        if isinstance(pipeline, OneStepPipeline):
            add(f"{name} (1 step)", lambda: pipeline.generate_prompts(held_out, seeds, runtime=run))
            if not pipeline.rewards and (tteo_steps or best_of):
                notes.append(f"{name} names no reward model: no TTEO or best-of rows.")
                tteo_steps, best_of = (), ()
            for k in tteo_steps:
                add(f"{name} + TTEO {k}", lambda k=k: refined_images(pipeline, held_out, seeds, steps=k, best_of=1), tteo_steps=k)
            for n in best_of:
                add(f"{name} best-of-{n}", lambda n=n: refined_images(pipeline, held_out, seeds, steps=0, best_of=n), best_of=n)
                for k in tteo_steps:
                    add(f"{name} best-of-{n} + TTEO {k}", lambda n=n, k=k: refined_images(pipeline, held_out, seeds, steps=k, best_of=n),
                        best_of=n, tteo_steps=k)  # fmt: skip
        else:
            for k in steps or [pipeline.sampler.steps]:
                add(f"{name} ({k} steps)", lambda k=k: pipeline.generate_prompts(held_out, seeds, steps=k, runtime=run), steps=k)
    rows.append(evaluator.reference_row())
    return Table(model=name, rows=rows, real_spread=evaluator.real_spread, notes=notes)


@torch.no_grad()
def reconstructions(tokenizer, images: Sequence[np.ndarray], batch: int = 100) -> list[np.ndarray]:
    from softdimo.vq import to_uint8

    device = tokenizer.codebook.device
    out: list[np.ndarray] = []
    for i in range(0, len(images), batch):
        x = to_tensor(np.stack(images[i : i + batch])).to(device)
        out.extend(to_uint8(tokenizer.decode_indices(tokenizer.encode(x))))
    return out


def refined_images(pipeline, prompts: Sequence[shapes.Prompt], seeds: Sequence[int], *, steps: int, best_of: int, batch: int = 50) -> list[np.ndarray]:
    """TTEO (or, with steps = 0, best-of-N selection alone) for each prompt, with the pipeline's default reward."""
    from dataclasses import replace

    from softdimo.tteo import candidate_seeds
    from softdimo.vq import to_uint8

    settings = replace(pipeline.tteo, steps=steps, best_of=best_of)
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        part = prompts[i : i + batch]
        conditions, texts = zip(*(pipeline.conditioner.for_prompt(p) for p in part))
        condition = torch.cat(conditions)
        refined = pipeline.refine(condition, list(texts), candidate_seeds(list(seeds[i : i + batch]), best_of), settings)
        out.extend(to_uint8(refined.images))
    return out


def results_table(rows: Sequence[Row], real_spread: float) -> str:
    """The evaluation's table: pass rate per kind and overall, Fréchet distance, spread against the data's, time."""
    kinds = list(rows[0].rates.per_kind)
    cells = [
        [r.name, *(f"{r.rates.per_kind[k]:.3f}" for k in kinds), f"**{r.rates.overall:.3f}**", f"{r.frechet:.2f}",
         f"{r.spread:.1f} ({r.spread / real_spread:.0%})", f"{1000 * r.seconds / r.rates_total:.1f}" if r.seconds else None]
        for r in rows
    ]  # fmt: skip
    return markdown_table(["model", *kinds, "overall", "Fréchet", "spread", "ms / image"], cells)


def timed(fn: Callable[[], list[np.ndarray]]) -> tuple[list[np.ndarray], float]:
    start = time.perf_counter()
    images = fn()
    return images, time.perf_counter() - start


def reward_accuracy(path, *, images: int, device, placement: str = "grid") -> dict[str, dict[str, float]]:
    """A reward bundle's share of held-out images whose true prompt scores above all 4 hard negative prompts
    ("prompts"), and of held-out prompts whose true image scores above all 4 hard negative images ("images"):
    overall and per prompt kind."""
    from softdimo.bundle import read_bundle
    from softdimo.pipeline import load_reward
    from softdimo.train.reward import hard_negative_wins

    reward = load_reward(read_bundle(path), device)
    prompts, prompt_wins, image_wins = hard_negative_wins(reward.model, count=images, seed=HELD_OUT_SEED, placement=placement)
    kinds = [k for k in shapes.KINDS if any(p.kind == k for p in prompts)]

    def shares(wins: torch.Tensor) -> dict[str, float]:
        per_kind = {k: wins[[p.kind == k for p in prompts]].float().mean().item() for k in kinds}
        return {"overall": wins.float().mean().item(), **per_kind}

    return {"prompts": shares(prompt_wins), "images": shares(image_wins)}
