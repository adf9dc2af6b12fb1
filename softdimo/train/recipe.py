"""Recipes: one TOML file per shipped bundle, the single source of its hyper-parameters, run stage by stage.

A recipe names its stage, the bundle it writes (`out`), the bundles it reads (an `[inputs]` table: `tokenizer`,
`teacher`, `init`, `reward`) and one table per configuration dataclass (`[training]`, `[transformer]`, `[sampler]`,
…); what a table leaves out takes the dataclass default. A stage is done when its run folder holds `done.json` for the
same recipe; until then rerunning it resumes from the run's last checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from softdimo.train import distributed, loop

STAGES = ("tokenizer", "features", "reward", "teacher", "latent", "prior", "prior-reward", "distill")
INPUTS = ("tokenizer", "teacher", "init", "reward")  # the bundles a stage may read, each perhaps another recipe's `out`
DONE = "done.json"
EXPORT_ONLY = ("sampler", "tteo", "check")  # tables that shape only the written bundle: a change re-exports it
LENGTH_ONLY = ("steps", "eval_every")  # [training] keys a run may change and go on: more steps continue it
DISTRIBUTED = ("teacher", "distill")  # stages that train on every rank under torchrun; the others run on the first


class RecipeError(ValueError):
    """A recipe that cannot be read or run as written."""


@dataclass(frozen=True)
class Recipe:
    path: Path
    data: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.data["stage"]

    @property
    def out(self) -> Path:
        return Path(self.data["out"])

    @property
    def run_dir(self) -> Path:
        return Path(self.data.get("run_dir", f"runs/{self.out.name}"))

    @property
    def inputs(self) -> dict[str, Path]:
        return {key: Path(value) for key, value in self.data.get("inputs", {}).items()}

    def table(self, name: str) -> dict[str, Any]:
        return dict(self.data.get(name, {}))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.data, sort_keys=True).encode()).hexdigest()[:16]

    def run_digest(self) -> str:
        """What a run's checkpoints depend on: the recipe less its export-only tables and its length."""
        data = {k: v for k, v in self.data.items() if k not in EXPORT_ONLY}
        data["training"] = {k: v for k, v in data.get("training", {}).items() if k not in LENGTH_ONLY}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any]:
    """A recipe file's tables; `base = "other.toml"` (relative to the file) starts from another recipe, so a
    variant states only what differs from it."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{path}: {exc}") from exc
    if "base" not in data:
        return data
    merged = _read(path.parent / data.pop("base"))
    merged.pop("run_dir", None)  # a variant never shares its base's run
    for key, value in data.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe; each override is `table.key=value` or `key=value`, the value in TOML syntax."""
    path = Path(path)
    data = _read(path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise RecipeError(f"override {item!r}: write table.key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word is a string
        *tables, leaf = key.split(".")
        target = data
        for table in tables:
            target = target.setdefault(table, {})
        target[leaf] = value
    if data.get("stage") not in STAGES:
        raise RecipeError(f"{path}: stage must be one of {', '.join(STAGES)}, got {data.get('stage')!r}")
    if "out" not in data:
        raise RecipeError(f"{path}: no `out` bundle folder")
    unknown = sorted(set(data.get("inputs", {})) - set(INPUTS))
    if unknown:
        raise RecipeError(f"{path}: unknown inputs {', '.join(unknown)}; inputs are {', '.join(INPUTS)}")
    steps = data.get("training", {}).get("steps", 1)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise RecipeError(f"{path}: training.steps must be a whole number of at least 1, got {steps!r}")
    return Recipe(path, data)


def build(cls: type, table: dict[str, Any], **fixed: Any):
    """A config dataclass from a recipe table, lists turned into tuples; unknown keys are refused."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise RecipeError(f"{cls.__name__} has no field {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
    values = {
        k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        for k, v in table.items()
    }
    return cls(**(values | fixed))


def order(recipes: Sequence[Recipe]) -> list[Recipe]:
    """Recipes sorted so that every bundle is written before a recipe that reads it."""
    writers = {r.out.resolve(): r for r in recipes}
    ordered: list[Recipe] = []
    visiting: set[Path] = set()

    def visit(recipe: Recipe) -> None:
        key = recipe.out.resolve()
        if recipe in ordered:
            return
        if key in visiting:
            raise RecipeError(f"{recipe.path}: recipes read each other's bundles in a cycle")
        visiting.add(key)
        for dependency in recipe.inputs.values():
            if dependency.resolve() in writers:
                visit(writers[dependency.resolve()])
        visiting.discard(key)
        ordered.append(recipe)

    for recipe in recipes:
        visit(recipe)
    return ordered


def is_done(recipe: Recipe) -> bool:
    marker = recipe.run_dir / DONE
    return marker.exists() and json.loads(marker.read_text()).get("recipe") == recipe.digest() and recipe.out.exists()


def run_recipe(recipe: Recipe, device: torch.device) -> float:
    """Train one stage (resuming its run) and write its bundle; returns the seconds it took.

    Under torchrun, teacher and distillation stages train on every rank (each its share of the batch) and the
    first rank writes the run's files and the bundle; other stages run on the first rank while the rest wait."""
    world = distributed.current()
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = run_dir / "recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("run") != recipe.run_digest():
        raise RecipeError(f"{run_dir} holds a run of another version of {recipe.path}; remove it to start again")
    distributed.barrier()  # every rank has read the stamp before the first writes it
    if world.is_main:
        stamp.write_text(json.dumps({"run": recipe.run_digest(), "data": recipe.data}, indent=2) + "\n")
    began = time.monotonic()
    out = recipe.out
    if world.is_main or recipe.stage in DISTRIBUTED:
        out = RUNNERS[recipe.stage](recipe, device)
    distributed.barrier()  # the bundle is written before any rank goes on to a stage that reads it
    seconds = max(time.monotonic() - began, _logged_training_seconds(run_dir))  # a resumed stage counts all its time
    if world.is_main:
        (run_dir / DONE).write_text(
            json.dumps({"recipe": recipe.digest(), "bundle": str(out), "seconds": round(seconds, 1)}) + "\n"
        )
    distributed.barrier()
    return seconds


def training_precision(device: torch.device) -> None:
    """On CUDA, fp32 matrix products and convolutions in training run as TF32 on the tensor cores."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def run_all(
    paths: Sequence[str | os.PathLike], device: torch.device, overrides: Sequence[str] = (), force: bool = False
) -> None:
    """Run recipes in dependency order, skipping stages already done; prints each stage's time.

    Under torchrun (`torchrun --nproc_per_node N -m server.cli train ...`) the processes train together."""
    world = distributed.init(device)
    device = distributed.local_device(device)
    training_precision(device)
    recipes = order([load_recipe(p, overrides) for p in paths])
    say = print if world.is_main else (lambda *args: None)  # one voice for N processes
    total = 0.0
    for recipe in recipes:
        if is_done(recipe) and not force:
            seconds = json.loads((recipe.run_dir / DONE).read_text())["seconds"]
            say(f"== {recipe.path}: done ({seconds / 60:.1f} min), {recipe.out}")
        else:
            say(f"== {recipe.path}: training {recipe.stage} -> {recipe.out}")
            seconds = run_recipe(recipe, device)
            say(f"== {recipe.path}: {seconds / 60:.1f} min")
        total += seconds
    say(f"== all stages: {total / 60:.1f} min")


def run_parallel(
    paths: Sequence[str | os.PathLike], device: str, jobs: int, overrides: Sequence[str] = (), force: bool = False
) -> None:
    """Run recipes as `jobs` stages at a time, each a `softdimo train` child process of its own with an equal share of
    the CPU threads, a stage starting once every bundle it reads is written; prints each stage's time and the wall
    time. A child's output goes to its run folder's train.log; a failed stage stops new ones and names its log.

    Of the stages ready, the one with the longest chain of stages waiting on it starts first, then the one that trains
    on more examples (steps × batch size): the longest path through the pipeline sets its wall time."""
    import subprocess
    import sys

    recipes = order([load_recipe(p, overrides) for p in paths])
    writers = {r.out.resolve(): r for r in recipes}
    needs = {r.path: {writers[d.resolve()].path for d in r.inputs.values() if d.resolve() in writers} for r in recipes}
    chain: dict[Path, int] = {}  # stages on the longest path that waits on each recipe
    for recipe in reversed(recipes):
        chain[recipe.path] = max((1 + chain[r.path] for r in recipes if recipe.path in needs[r.path]), default=0)
    examples = {r.path: r.table("training").get("steps", 0) * r.table("training").get("batch_size", 1) for r in recipes}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending, running, finished, failed = list(recipes), {}, set(), []
    began = time.monotonic()
    while pending or running:
        while pending and len(running) < jobs and not failed:
            ready = [r for r in pending if needs[r.path] <= finished]
            if not ready:
                break
            ready = max(ready, key=lambda r: (chain[r.path], examples[r.path]))
            pending.remove(ready)
            if is_done(ready) and not force:
                seconds = json.loads((ready.run_dir / DONE).read_text())["seconds"]
                print(f"== {ready.path}: done ({seconds / 60:.1f} min), {ready.out}")
                finished.add(ready.path)
                continue
            ready.run_dir.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "softdimo.cli", "train", str(ready.path), "--device", device]
            command += [f"--set={item}" for item in overrides] + (["--force"] if force else [])
            log = open(ready.run_dir / "train.log", "ab")
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            running[ready.path] = (ready, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
            log_path = ready.run_dir / "train.log"
            print(f"== {ready.path}: training {ready.stage} -> {ready.out} ({threads} threads, log {log_path})")
        if not running:
            if failed or not pending:
                break
            raise RecipeError(f"{pending[0].path}: reads a bundle no finished recipe wrote")
        time.sleep(0.5)
        for path, (recipe, process, log) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[path]
            if process.returncode:
                failed.append(recipe)
                print(f"== {recipe.path}: failed (exit {process.returncode}), see {recipe.run_dir / 'train.log'}")
                continue
            finished.add(path)
            seconds = json.loads((recipe.run_dir / DONE).read_text())["seconds"]
            print(f"== {recipe.path}: {seconds / 60:.1f} min")
    if failed:
        raise RecipeError(f"{len(failed)} stage(s) failed: " + ", ".join(str(r.path) for r in failed))
    print(f"== all stages: {(time.monotonic() - began) / 60:.1f} min wall time, {jobs} at a time")


def _logged_training_seconds(run_dir: Path) -> float:
    """The training time a run's metrics log records, across resumes (0 without a log)."""
    from softdimo.train.curve import training_curve

    if not (run_dir / "metrics.jsonl").exists():
        return 0.0
    return 60 * training_curve(run_dir, evaluated_only=False)[-1]["minutes"]


def _relative(target: Path, out: Path) -> str:
    return os.path.relpath(target.resolve(), out.resolve())


# ------------------------------------------------------------------ one runner per stage


def _tokenizer(recipe: Recipe, device: torch.device) -> Path:
    from softdimo.pipeline import save_tokenizer
    from softdimo.train.tokenizer import TokenizerTraining, train_tokenizer
    from softdimo.vq import TokenizerConfig

    training = build(TokenizerTraining, recipe.table("training"))
    tokenizer = train_tokenizer(recipe.run_dir, build(TokenizerConfig, recipe.table("tokenizer")), training, device)
    return save_tokenizer(tokenizer.cpu(), recipe.out, name=recipe.out.name, training=asdict(training))


def _features(recipe: Recipe, device: torch.device) -> Path:
    from softdimo.features import FeatureNetConfig
    from softdimo.pipeline import save_features
    from softdimo.train.features import FeatureTraining, train_features

    training = build(FeatureTraining, recipe.table("training"))
    net = train_features(recipe.run_dir, build(FeatureNetConfig, recipe.table("features")), training, device)
    return save_features(net.cpu(), recipe.out, name=recipe.out.name, training=asdict(training))


def _reward(recipe: Recipe, device: torch.device) -> Path:
    from softdimo.reward import AlignmentConfig
    from softdimo.pipeline import save_reward
    from softdimo.train.reward import RewardTraining, train_reward

    training = build(RewardTraining, recipe.table("training"))
    model = train_reward(recipe.run_dir, build(AlignmentConfig, recipe.table("alignment")), training, device)
    return save_reward(model.cpu(), recipe.out, name=recipe.out.name, training=asdict(training))


def _teacher_parts(recipe: Recipe, device: torch.device) -> dict:
    """What a teacher recipe trains: its tokenizer, conditioner, transformer config and training settings."""
    from softdimo.bundle import read_bundle
    from softdimo.conditioning import Conditioner
    from softdimo.pipeline import load_tokenizer
    from softdimo.train.teacher import TeacherTraining
    from softdimo.transformer import TransformerConfig

    tokenizer = load_tokenizer(read_bundle(recipe.inputs["tokenizer"]), device)
    conditioner = Conditioner.for_shapes(recipe.data.get("conditioning", "text"))
    table = recipe.table("transformer")
    if table.pop("code_features", False):
        table["code_dim"] = tokenizer.cfg.code_dim
    cfg = build(
        TransformerConfig,
        table,
        codebook_size=tokenizer.cfg.codebook_size,
        tokens=tokenizer.cfg.grid**2,
        **conditioner.model_sizes(),
    )
    return {
        "tokenizer": tokenizer,
        "conditioner": conditioner,
        "cfg": cfg,
        "training": build(TeacherTraining, recipe.table("training")),
    }


def profile_recipe(recipe: Recipe, device: torch.device, steps: int) -> tuple[loop.StageCost, dict[str, float]]:
    """What a recipe's stage costs on `device`, trained nothing and written nothing: its own training measured on
    `steps` steps and one evaluation (loop.timed), and for a teacher where a step's time goes by phase
    (train.teacher.profile_steps; empty for other stages). The bundles it reads must exist."""
    import tempfile

    training_precision(device)
    with tempfile.TemporaryDirectory() as scratch:
        measured = replace(recipe, data=recipe.data | {"run_dir": f"{scratch}/run", "out": f"{scratch}/bundle"})
        try:
            with loop.timed(steps):
                RUNNERS[recipe.stage](measured, device)
        except loop.Timed as timed:
            cost = timed.cost
        else:
            raise RecipeError(f"{recipe.path}: its {recipe.stage} stage finished without a training loop to time")
    if recipe.stage != "teacher":
        return cost, {}
    from softdimo.train.teacher import profile_steps

    return cost, profile_steps(**_teacher_parts(recipe, device), device=device, steps=steps)


def _teacher(recipe: Recipe, device: torch.device) -> Path:
    from softdimo.sampler import SamplerSettings
    from softdimo.pipeline import save_teacher
    from softdimo.train.teacher import train_teacher

    parts = _teacher_parts(recipe, device)
    tokenizer, conditioner, cfg, training = parts["tokenizer"], parts["conditioner"], parts["cfg"], parts["training"]
    sampler = build(SamplerSettings, recipe.table("sampler"))
    model = train_teacher(
        run_dir=recipe.run_dir,
        tokenizer=tokenizer,
        conditioner=conditioner,
        cfg=cfg,
        training=training,
        sampler=sampler,
        device=device,
    )
    if not distributed.current().is_main:
        return recipe.out
    return save_teacher(
        model.cpu(),
        recipe.out,
        name=recipe.out.name,
        conditioner=conditioner,
        sampler=sampler,
        tokenizer_reference=_relative(recipe.inputs["tokenizer"], recipe.out),
        reward_references=[_relative(recipe.inputs["reward"], recipe.out)] if "reward" in recipe.inputs else [],
        check=_check(recipe),
        training=asdict(training),
    )


def _check(recipe: Recipe):
    """The recipe's draw check (`[check]`), or None; it needs the reward the recipe reads (`inputs.reward`)."""
    from softdimo.draw_check import DrawCheck

    if not recipe.table("check"):
        return None
    if "reward" not in recipe.inputs:
        raise RecipeError(f"{recipe.path}: a draw check scores images by a reward: give inputs.reward")
    return build(DrawCheck, recipe.table("check"))


def _distill(recipe: Recipe, device: torch.device) -> Path:
    from softdimo.bundle import read_bundle
    from softdimo.generator import GeneratorSettings
    from softdimo.pipeline import load_pipeline, load_reward
    from softdimo.train.distill import DistillParts, DistillTraining, train_distill

    inputs = recipe.inputs
    teacher = load_pipeline(inputs["teacher"], device)
    reward = load_reward(read_bundle(inputs["reward"]), device) if "reward" in inputs else None
    training = build(DistillTraining, recipe.table("training"))
    if training.reward_weight and reward is None:
        raise RecipeError(f"{recipe.path}: reward_weight needs a `reward` bundle")
    initial = prior = None
    if "init" in inputs:
        start = load_pipeline(inputs["init"], device)
        if not hasattr(start, "generator") or replace(start.generator.cfg, latent_dim=0) != teacher.model.cfg:
            raise RecipeError(
                f"{recipe.path}: init {inputs['init']} is not a one-step model of the teacher's architecture"
            )
        initial, prior = start.generator.model, start.generator.prior
    prompts = None
    if "prompts" in recipe.data:  # a text file of prompts, one a line, relative to the recipe
        lines = (recipe.path.parent / recipe.data["prompts"]).read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    parts = DistillParts(
        teacher=teacher.model,
        tokenizer=teacher.tokenizer,
        conditioner=teacher.conditioner,
        reward=reward,
        initial=initial,
        prior=prior,
        prompts=prompts,
    )
    settings = build(GeneratorSettings, recipe.table("generator"))
    generator = train_distill(
        run_dir=recipe.run_dir, parts=parts, generator_settings=settings, training=training, device=device
    )
    if not distributed.current().is_main:
        return recipe.out
    return _save_generator(recipe, generator, teacher.conditioner, training=asdict(training))


def _latent(recipe: Recipe, device: torch.device) -> Path:
    from softdimo.generator import GeneratorSettings
    from softdimo.pipeline import load_pipeline
    from softdimo.train.latent import LatentTraining, train_latent

    teacher = load_pipeline(recipe.inputs["teacher"], device)
    training = build(LatentTraining, recipe.table("training"))
    table = recipe.table("transformer")
    if set(table) - {"latent_dim"}:
        raise RecipeError(
            f"{recipe.path}: a latent stage's network is its teacher's; [transformer] sets latent_dim only"
        )
    latent_dim = table.get("latent_dim", 0)
    generator, encoder = train_latent(
        run_dir=recipe.run_dir,
        teacher=teacher.model,
        tokenizer=teacher.tokenizer,
        conditioner=teacher.conditioner,
        latent_dim=latent_dim,
        generator_settings=build(GeneratorSettings, recipe.table("generator")),
        training=training,
        device=device,
    )
    return _save_generator(recipe, generator, teacher.conditioner, training=asdict(training), encoder=encoder.cpu())


def _prior(recipe: Recipe, device: torch.device) -> Path:
    from softdimo.bundle import read_bundle
    from softdimo.pipeline import load_pipeline
    from softdimo.train.latent import load_layout_encoder
    from softdimo.train.prior import PriorNetwork, PriorTraining, train_prior

    init = read_bundle(recipe.inputs["init"])
    start = load_pipeline(init, device)
    if not getattr(start, "generator", None) or not start.generator.cfg.latent_dim:
        raise RecipeError(f"{recipe.path}: init {recipe.inputs['init']} is not a one-step model with a layout latent")
    training = build(PriorTraining, recipe.table("training"))
    generator = train_prior(
        run_dir=recipe.run_dir,
        generator=start.generator,
        encoder=load_layout_encoder(init, device),
        tokenizer=start.tokenizer,
        conditioner=start.conditioner,
        network=build(PriorNetwork, recipe.table("prior")),
        training=training,
        device=device,
    )
    return _save_generator(recipe, generator, start.conditioner, training=asdict(training))


def _prior_reward(recipe: Recipe, device: torch.device) -> Path:
    from softdimo.bundle import read_bundle
    from softdimo.pipeline import load_pipeline, load_reward
    from softdimo.train.prior import PriorTuning, tune_prior

    start = load_pipeline(recipe.inputs["init"], device)
    if getattr(start, "generator", None) is None or start.generator.prior is None:
        raise RecipeError(f"{recipe.path}: init {recipe.inputs['init']} is not a one-step model with a layout prior")
    if "reward" not in recipe.inputs:
        raise RecipeError(f"{recipe.path}: tuning a layout prior needs a `reward` bundle")
    training = build(PriorTuning, recipe.table("training"))
    generator = tune_prior(
        run_dir=recipe.run_dir,
        generator=start.generator,
        tokenizer=start.tokenizer,
        conditioner=start.conditioner,
        reward=load_reward(read_bundle(recipe.inputs["reward"]), device),
        training=training,
        device=device,
    )
    return _save_generator(recipe, generator, start.conditioner, training=asdict(training))


def _save_generator(recipe: Recipe, generator, conditioner, training: dict, encoder=None) -> Path:
    """Write a one-step stage's bundle: its teacher's tokenizer, the recipe's reward (if any) and TTEO settings, and
    a latent stage's layout encoder."""
    from softdimo.bundle import read_bundle
    from softdimo.pipeline import save_one_step
    from softdimo.tteo import TTEOSettings

    inputs = recipe.inputs
    generator.model.cpu()
    if generator.prior is not None:
        generator.prior.cpu()
    teacher_bundle = read_bundle(inputs["teacher"])
    reward_references = [_relative(inputs["reward"], recipe.out)] if "reward" in inputs else []
    tteo = build(TTEOSettings, recipe.table("tteo"))
    check = _check(recipe)
    if teacher_bundle.config.get("architecture") == "diffusers-muse":
        from softdimo import muse

        if check is not None:
            raise RecipeError(f"{recipe.path}: a draw check needs a layout prior, which a MUSE generator has not")

        return muse.export_generator(
            generator=generator,
            teacher=teacher_bundle,
            path=recipe.out,
            name=recipe.out.name,
            reward_references=reward_references,
            tteo=tteo.to_dict(),
            training=training,
            teacher_reference=_relative(inputs["teacher"], recipe.out),
        )
    return save_one_step(
        generator,
        recipe.out,
        name=recipe.out.name,
        conditioner=conditioner,
        tokenizer_reference=_relative(teacher_bundle.path / teacher_bundle.config["tokenizer"], recipe.out),
        reward_references=reward_references,
        tteo=tteo,
        teacher_reference=_relative(inputs["teacher"], recipe.out),
        training=training,
        encoder=encoder,
        check=check,
    )


RUNNERS: dict[str, Callable[[Recipe, torch.device], Path]] = {
    "tokenizer": _tokenizer,
    "features": _features,
    "reward": _reward,
    "teacher": _teacher,
    "latent": _latent,
    "prior": _prior,
    "prior-reward": _prior_reward,
    "distill": _distill,
}
