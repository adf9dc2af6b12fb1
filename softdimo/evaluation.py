"""Evaluation: a model's images on held-out prompts, judged: pass rates beside per-prompt layout coverage, and
Fréchet distance; a reward's accuracy on hard negatives."""

from __future__ import annotations

import functools
import math
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
COVERAGE_PROMPTS = 50  # prompts whose layout coverage is measured: the first of the held-out set, 10 of each kind


@dataclass
class Row:
    """One line of an evaluation table."""

    name: str
    rates: judge.PassRates
    frechet: float
    coverage: judge.Coverage | None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    # a few seeds of a few coverage prompts, by prompt
    samples: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def rates_total(self) -> int:
        return sum(self.rates.counts.values())

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "overall": round(self.rates.overall, 4),
            "per_kind": {k: round(v, 4) for k, v in self.rates.per_kind.items()},
            "failures": self.rates.failures,
            "frechet": round(self.frechet, 3),
            "seconds": round(self.seconds, 1),
            **({"coverage": coverage_dict(self.coverage)} if self.coverage else {}),
            **self.extra,
        }


def coverage_dict(coverage: judge.Coverage) -> dict:
    return {
        "mean": round(coverage.mean, 4),
        "min": round(coverage.minimum, 4),
        "per_kind": {k: round(v, 4) for k, v in coverage.per_kind.items()},
        "commonest": round(coverage.commonest, 4),
        "data_commonest": round(coverage.data_commonest, 4),
        "prompts": len(coverage.prompts),
        "seeds": coverage.prompts[0].images,
    }


def real_images(prompts: Sequence[shapes.Prompt], seed: int = REAL_SEED, placement: str = "grid") -> list[np.ndarray]:
    return shapes.render_prompts(prompts, np.random.default_rng(seed), placement)


@torch.no_grad()
def feature_vectors(net: FeatureNet, images: Sequence[np.ndarray]) -> np.ndarray:
    out = []
    for i in range(0, len(images), 100):
        out.append(
            net.features(to_tensor(np.stack(images[i : i + 100])).to(next(net.parameters()).device)).cpu().numpy()
        )
    return np.concatenate(out).astype(np.float64)


Images = Callable[[Sequence[shapes.Prompt], Sequence[int]], list[np.ndarray]]  # (prompts, seeds) -> one image each


class Evaluator:
    """Judges images for a fixed prompt set and compares their features with real images of the same prompts; and
    measures layout coverage: `coverage_seeds` images of each of `coverage_prompts` prompts against as many of the
    world's scenes of each."""

    def __init__(
        self,
        prompts: Sequence[shapes.Prompt],
        features: FeatureNet,
        placement: str = "grid",
        *,
        coverage_prompts: int = COVERAGE_PROMPTS,
        coverage_seeds: int = judge.COVERAGE_SEEDS,
    ):
        self.prompts = list(prompts)
        self.features = features
        self.placement = placement
        self.real_features = feature_vectors(features, real_images(self.prompts, placement=placement))
        self.coverage_prompts = self.prompts[:coverage_prompts]
        self.coverage_seeds = list(range(coverage_seeds))
        self.coverage_data = self._repeated(lambda p, s: real_images(p, seed=REAL_SEED, placement=placement))

    def _repeated(self, make: Images) -> list[np.ndarray]:
        """`make`'s images of each coverage prompt at every coverage seed, one prompt after another."""
        prompts = [p for p in self.coverage_prompts for _ in self.coverage_seeds]
        return make(prompts, self.coverage_seeds * len(self.coverage_prompts)) if prompts else []

    def row(self, name: str, make: Images, **extra) -> Row:
        """The row of a way of drawing images: pass rates and Fréchet distance on the prompts (prompt i at seed i,
        timed), and layout coverage on the coverage prompts."""
        start = time.perf_counter()
        images = make(self.prompts, list(range(len(self.prompts))))
        seconds = time.perf_counter() - start
        repeated = self._repeated(make)
        per = len(self.coverage_seeds)
        return Row(
            name=name,
            rates=judge.pass_rates(images, self.prompts),
            frechet=judge.frechet_distance(feature_vectors(self.features, images), self.real_features),
            coverage=judge.coverage(repeated, self.coverage_data, self.coverage_prompts) if repeated else None,
            seconds=seconds,
            extra=extra,
            samples=[
                image for i in range(min(5, len(self.coverage_prompts))) for image in repeated[i * per : i * per + 10]
            ],
        )

    def reference_row(self) -> Row:
        """A second draw of the world's images: the pass rate, Fréchet distance and coverage of sampling alone."""
        return self.row(
            "real images (reference)", lambda p, s: real_images(p, seed=REAL_SEED + 1, placement=self.placement)
        )


@dataclass
class Table:
    """The rows of one model's evaluation, on one prompt set, with the real-image reference last."""

    model: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)  # lines printed under the table

    def markdown(self) -> str:
        return "\n\n".join([results_table(self.rows), *self.notes])

    def as_dict(self) -> dict:
        return {"model": self.model, "rows": [r.as_dict() for r in self.rows], "notes": self.notes}


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked."""


def evaluate_bundle(
    path,
    *,
    features: FeatureNet,
    prompts: int,
    steps: Sequence[int] | None,
    tteo_steps: Sequence[int],
    best_of: Sequence[int],
    device,
    grid_dir=None,
    placement: str = "grid",
    sampler: dict | None = None,
    tteo: dict | None = None,
    generator: dict | None = None,
    check: dict | None = None,
    runtime=None,
    coverage_prompts: int = COVERAGE_PROMPTS,
    coverage_seeds: int = judge.COVERAGE_SEEDS,
) -> Table:
    """Every row for one bundle: reconstructions for a tokenizer; samples at each step count for a teacher;
    one step, TTEO at each step count and best-of-N (alone and with TTEO) for a one-step model.
    `sampler` overrides a teacher's sampler settings, `tteo` a one-step model's TTEO settings (target, lr) and
    `generator` its generator settings (temperature, latent_scale) and `check` its draw check (bar, proposals,
    prior_temperature; a model without one gets one on its default reward);
    `runtime` (softdimo.runtime.RuntimeSettings) runs the sampled rows as the server would with it (bf16, compiled);
    every row's layout coverage is measured on the first `coverage_prompts` held-out prompts (0: none), each drawn
    at seeds 0 .. `coverage_seeds` - 1."""
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

    def add(label: str, make: Images, **extra) -> None:
        rows.append(row := evaluator.row(label, make, **extra))
        if grid_dir is not None and row.samples:  # one prompt a line, ten seeds each
            slug = (
                label.replace(" ", "_")
                .replace("(", "")
                .replace(")", "")
                .replace(",", "")
                .replace("+", "plus")
                .replace("=", "")
            )
            save_grid(row.samples, grid_dir / f"{slug}.png", columns=10)

    if bundle.config["kind"] == "tokenizer":
        held_out = judge.held_out_prompts(prompts, seed=HELD_OUT_SEED)
        evaluator = Evaluator(
            held_out, features, placement, coverage_prompts=coverage_prompts, coverage_seeds=coverage_seeds
        )
        tokenizer = load_tokenizer(bundle, device)
        add(f"{name} reconstructions", lambda p, s: reconstructions(tokenizer, real_images(p, placement=placement)))
        with torch.no_grad():
            originals = to_tensor(np.stack(real_images(held_out, placement=placement))).to(device)
            used = tokenizer.encode(originals).unique().numel()
        notes.append(f"Codes used by the {len(originals)} held-out images: {used} of {tokenizer.cfg.codebook_size}.")
    else:
        pipeline = load_pipeline(path, device)
        held_out = judge.held_out_prompts(prompts, seed=HELD_OUT_SEED, kinds=pipeline.conditioner.kinds)
        evaluator = Evaluator(
            held_out, features, placement, coverage_prompts=coverage_prompts, coverage_seeds=coverage_seeds
        )
        if check and pipeline.check is None:
            from softdimo.draw_check import DrawCheck

            try:
                drawn_checked = DrawCheck(reward=pipeline.default_reward, bar=check.get("bar", math.inf))
                pipeline = replace(pipeline, check=drawn_checked)
            except ValueError as exc:  # no reward, or no layout prior to propose latents
                raise EvaluationError(f"{name}: {exc}") from exc
        if isinstance(pipeline, OneStepPipeline):
            changes = [
                (pipeline, "tteo", tteo),
                (pipeline.generator, "settings", generator),
                (pipeline, "check", check),
            ]
        else:
            if check and "prior_temperature" in check:
                raise EvaluationError(f"{name}: a teacher's draw check has no layout prior to flatten")
            changes = [(pipeline, "sampler", sampler), (pipeline, "check", check)]
        for owner, attribute, overrides in changes:
            if not overrides:
                continue
            settings = getattr(owner, attribute)
            known = [f.name for f in fields(settings)]
            if unknown := sorted(set(overrides) - set(known)):
                raise EvaluationError(
                    f"{name}: no {type(settings).__name__} setting {', '.join(unknown)}; "
                    f"settings are {', '.join(known)}"
                )
            setattr(owner, attribute, replace(settings, **overrides))
            name = f"{name} ({', '.join(f'{k} {v}' for k, v in overrides.items())})"
        if run is not None:
            changed = {k: v for k, v in runtime.to_dict().items() if v != getattr(RuntimeSettings(), k)}
            name = f"{name} ({', '.join(f'{k} {v}' for k, v in changed.items())})"
        if isinstance(pipeline, OneStepPipeline):
            add(f"{name} (1 step)", lambda p, s: pipeline.generate_prompts(p, s, runtime=run))
            if not pipeline.rewards and (tteo_steps or best_of):
                notes.append(f"{name} names no reward model: no TTEO or best-of rows.")
                tteo_steps, best_of = (), ()
            refined = functools.partial(refined_images, pipeline)
            for k in tteo_steps:
                add(f"{name} + TTEO {k}", functools.partial(refined, steps=k, best_of=1), tteo_steps=k)
            for n in best_of:
                add(f"{name} best-of-{n}", functools.partial(refined, steps=0, best_of=n), best_of=n)
                for k in tteo_steps:
                    add(
                        f"{name} best-of-{n} + TTEO {k}",
                        functools.partial(refined, steps=k, best_of=n),
                        best_of=n,
                        tteo_steps=k,
                    )
        else:
            for k in steps or [pipeline.sampler.steps]:
                add(
                    f"{name} ({k} steps)",
                    lambda p, s, k=k: pipeline.generate_prompts(p, s, steps=k, runtime=run),
                    steps=k,
                )
    rows.append(evaluator.reference_row())
    return Table(model=name, rows=rows, notes=notes)


@torch.no_grad()
def reconstructions(tokenizer, images: Sequence[np.ndarray], batch: int = 100) -> list[np.ndarray]:
    from softdimo.vq import to_uint8

    device = tokenizer.codebook.device
    out: list[np.ndarray] = []
    for i in range(0, len(images), batch):
        x = to_tensor(np.stack(images[i : i + batch])).to(device)
        out.extend(to_uint8(tokenizer.decode_indices(tokenizer.encode(x))))
    return out


def refined_images(
    pipeline, prompts: Sequence[shapes.Prompt], seeds: Sequence[int], *, steps: int, best_of: int, batch: int = 50
) -> list[np.ndarray]:
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
        refined = pipeline.refine(
            condition, list(texts), candidate_seeds(list(seeds[i : i + batch]), best_of), settings
        )
        out.extend(to_uint8(refined.images))
    return out


def results_table(rows: Sequence[Row]) -> str:
    """The evaluation's table: pass rate per kind and overall beside layout coverage (mean, minimum, the commonest
    layout's share of a prompt's images), then Fréchet distance and time."""
    kinds = list(rows[0].rates.per_kind)

    def coverage_cells(c: judge.Coverage | None) -> list[str | None]:
        return [f"**{c.mean:.2f}**", f"{c.minimum:.2f}", f"{c.commonest:.2f}"] if c else [None] * 3

    cells = [
        [
            r.name,
            *(f"{r.rates.per_kind[k]:.3f}" for k in kinds),
            f"**{r.rates.overall:.3f}**",
            *coverage_cells(r.coverage),
            f"{r.frechet:.2f}",
            f"{1000 * r.seconds / r.rates_total:.1f}" if r.seconds else None,
        ]
        for r in rows
    ]
    header = ["model", *kinds, "pass", "coverage", "min", "commonest", "Fréchet", "ms / image"]
    return markdown_table(header, cells)


def reward_accuracy(path, *, images: int, device, placement: str = "grid") -> dict[str, dict[str, float]]:
    """A reward bundle's share of held-out images whose true prompt scores above all 4 hard negative prompts
    ("prompts"), and of held-out prompts whose true image scores above all 4 hard negative images ("images"):
    overall and per prompt kind."""
    from softdimo.bundle import read_bundle
    from softdimo.pipeline import load_reward
    from softdimo.train.reward import hard_negative_wins

    reward = load_reward(read_bundle(path), device)
    prompts, prompt_wins, image_wins = hard_negative_wins(
        reward.model, count=images, seed=HELD_OUT_SEED, placement=placement
    )
    kinds = [k for k in shapes.KINDS if any(p.kind == k for p in prompts)]

    def shares(wins: torch.Tensor) -> dict[str, float]:
        per_kind = {k: wins[[p.kind == k for p in prompts]].float().mean().item() for k in kinds}
        return {"overall": wins.float().mean().item(), **per_kind}

    return {"prompts": shares(prompt_wins), "images": shares(image_wins)}
