"""The engine: loaded models on one device, their batch functions (what the batchers call), and the bundle checks
before a server starts."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from softdimo.bundle import BundleError, read_bundle
from softdimo.conditioning import Conditioner
from softdimo.device import resolve_device
from softdimo.pipeline import OneStepPipeline, TeacherPipeline, load_pipeline
from softdimo.runtime import Runtime, RuntimeSettings
from softdimo.tteo import Chunks, Refined, StepHook
from softdimo.vq import to_uint8
from softdimo.warmup import example_inputs, warm_up_conditions

from server.jobs import EditJob, EditRefineJob, GenerateJob, RefinedImage, Refinement, RefineJob, split_counts

log = logging.getLogger("softdimo.engine")


@dataclass
class ServedModel:
    """A model the server answers for: its pipeline and what /v1/models says of it."""

    name: str
    kind: str  # "one-step" or "masked-diffusion"
    pipeline: TeacherPipeline | OneStepPipeline
    image_size: int
    defaults: dict = field(default_factory=dict)
    rewards: list[str] = field(default_factory=list)
    runtime: Runtime = field(default_factory=Runtime)  # precision, compiled buckets, pinned copies: all off by default

    @property
    def conditioner(self) -> Conditioner:
        return self.pipeline.conditioner

    @property
    def conditioning(self) -> str:
        return self.conditioner.conditioning

    def card(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "conditioning": self.conditioning,
            "image_size": self.image_size,
            "classes": self.conditioner.class_names or None,
            "rewards": self.rewards,
            "default": self.defaults,
        }

    def generate_batch(self, jobs: Sequence[GenerateJob]) -> list[list[np.ndarray]]:
        """All jobs of one batch in one pass (they share `steps`); returns each job's images."""
        condition = torch.cat([job.condition.expand(job.n, *job.condition.shape[1:]) for job in jobs])
        seeds = [s for job in jobs for s in job.seeds]
        images = self.runtime.generate(self.pipeline, condition, seeds, steps=jobs[0].steps)
        return split_counts(list(images), [job.n for job in jobs])

    @property
    def edits(self) -> bool:
        """Whether the model edits images: every pipeline softdimo loads does (softdimo.editing.EditsByFilling)."""
        return hasattr(self.pipeline, "edit")

    def edit_batch(self, jobs: Sequence[EditJob]) -> list[list[np.ndarray]]:
        """All jobs of one batch in one pass (they share `steps` and `strength`): each image its request's, with its
        own tokens repainted (image-to-image: as the pipeline's `edit_at_strength` repaints them); returns each job's
        images."""
        images, repaint, condition = _edit_inputs(jobs)
        seeds = [s for job in jobs for s in job.seeds]
        steps, strength = jobs[0].steps, jobs[0].strength
        with self.runtime.running(self.pipeline):  # eager, as TTEO: compiled buckets are /generate's
            if strength is None:
                edited = self.pipeline.edit(images, repaint, condition, seeds, steps=steps)
            else:
                edited = self.pipeline.edit_at_strength(images, strength, condition, seeds, steps=steps)
        return split_counts(list(edited), [job.n for job in jobs])

    def refine_edit_batch(
        self, jobs: Sequence[EditRefineJob], *, chunks: Chunks | None = None
    ) -> list[list[RefinedImage]]:
        """TTEO on the edits of one batch (they share settings and reward), as `refine_batch`."""
        images, repaint, condition = _edit_inputs([job.edit for job in jobs])
        texts = [job.text for job in jobs for _ in range(job.n)]
        candidates = [list(row) for job in jobs for row in job.candidates]
        with self.runtime.running(self.pipeline):
            refined = self.pipeline.refine_edit(
                images,
                repaint,
                condition,
                texts,
                candidates,
                jobs[0].settings,
                reward=jobs[0].reward,
                on_step=_step_reports(jobs),
                chunks=chunks,
            )
            items = _refined_images(refined)
        return split_counts(items, [job.n for job in jobs])

    def reward_text(self, prompt: str | None, class_label: int | None) -> str:
        return self.conditioner.reward_text(prompt, class_label)

    def refine_batch(self, jobs: Sequence[RefineJob], *, chunks: Chunks | None = None) -> list[list[RefinedImage]]:
        """TTEO for all jobs of one batch at once (they share settings and reward); each image on its own. With
        `chunks`, in pieces of images with its pause between them (other work that must not wait for the whole
        batch)."""
        condition = torch.cat([job.condition.expand(job.n, *job.condition.shape[1:]) for job in jobs])
        texts = [job.text for job in jobs for _ in range(job.n)]
        candidates = [list(row) for job in jobs for row in job.candidates]
        with self.runtime.running(self.pipeline):  # eager: TTEO takes gradients through the network
            refined = self.pipeline.refine(
                condition,
                texts,
                candidates,
                jobs[0].settings,
                reward=jobs[0].reward,
                on_step=_step_reports(jobs),
                chunks=chunks,
            )
            items = _refined_images(refined)  # in `running`: its copy to host
        return split_counts(items, [job.n for job in jobs])


def _edit_inputs(jobs: Sequence[EditJob]) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """A batch of edits as a pipeline takes them: images (B, H, W, 3), repainted tokens (B, N), conditioning."""
    images = np.stack([job.image for job in jobs for _ in range(job.n)])
    repaint = torch.cat([job.repaint for job in jobs])
    condition = torch.cat([job.condition.expand(job.n, *job.condition.shape[1:]) for job in jobs])
    return images, repaint, condition


def _refined_images(refined: Refined) -> list[RefinedImage]:
    images = to_uint8(refined.images)
    before, after = refined.reward_before.tolist(), refined.reward_after.tolist()
    return [RefinedImage(images[i], before[i], after[i], refined.seeds[i]) for i in range(len(images))]


def _step_reports(jobs: Sequence[Refinement]) -> StepHook | None:
    """A TTEO step hook: hand each streaming job its images' rewards; keep optimising only uncancelled jobs' images.
    None where no job streams."""
    if all(job.progress is None for job in jobs):
        return None

    def on_step(step: int, rewards: torch.Tensor) -> torch.Tensor:
        values = rewards.tolist()
        wanted: list[bool] = []
        for job, part in zip(jobs, split_counts(values, [job.n for job in jobs])):
            if job.progress is not None:
                job.progress.report(step, job.seeds, part)
            wanted += [job.progress is None or not job.progress.cancelled.is_set()] * job.n
        return torch.tensor(wanted)

    return on_step


def verify_bundles(paths: Sequence[str | Path]) -> None:
    """Check the bundles to be served, and the bundles they reference, against their manifests.

    Raises BundleError naming the first missing or altered file; a fast pass before a server starts."""
    if not paths:
        raise BundleError("no bundles to serve: give --weights (or SOFTDIMO_WEIGHTS)")
    pending, seen = [Path(p) for p in paths], set()
    while pending:
        path = pending.pop(0).resolve()
        if path in seen:
            continue
        seen.add(path)
        bundle = read_bundle(path)
        references = [bundle.config.get("tokenizer"), *bundle.config.get("rewards", [])]
        pending.extend(bundle.path / ref for ref in references if isinstance(ref, str))


def load_model(path: str | Path, device: torch.device, runtime: Runtime | None = None) -> ServedModel:
    bundle = read_bundle(path)
    pipeline = load_pipeline(path, device)
    kind = bundle.config["kind"]
    if kind == "masked-diffusion":
        defaults, rewards = {"steps": pipeline.sampler.steps, "guidance": pipeline.sampler.guidance}, []
    else:
        # what a /refine request that leaves every setting out gets
        defaults = {"refine": {**pipeline.tteo.for_request().to_dict(), "reward": pipeline.default_reward}}
        rewards = list(pipeline.rewards)
    return ServedModel(
        name=bundle.config["name"],
        kind=kind,
        pipeline=pipeline,
        image_size=pipeline.tokenizer.cfg.image_size,
        defaults=defaults,
        rewards=rewards,
        runtime=runtime or Runtime(),
    )


class Engine:
    """The models of one server process, loaded onto one device."""

    def __init__(self, models: Sequence[ServedModel], device: torch.device):
        if not models:
            raise ValueError("no models to serve: give at least one bundle folder with --weights")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"two bundles share a model name: {names}")
        self.models = {m.name: m for m in models}
        self.default_model = models[0].name
        self.device = device

    @classmethod
    def load(
        cls,
        paths: Sequence[str],
        device_name: str,
        *,
        runtime: RuntimeSettings = RuntimeSettings(),
        max_batch_size: int = 1,
    ) -> Engine:
        """The bundles at `paths` on the device, run with `runtime` in batches of at most `max_batch_size` images."""
        device = resolve_device(device_name)
        torch.set_grad_enabled(False)
        shared = Runtime(runtime, max_batch_size=max_batch_size)
        models = []
        for path in paths:
            began = time.perf_counter()
            models.append(load_model(path, device, shared))
            log.info("loaded %s from %s on %s in %.2fs", models[-1].name, path, device, time.perf_counter() - began)
        return cls(models, device)

    def warm_up(self, max_batch_size: int) -> None:
        """Run every model at the largest batch (compiled: at every bucket, and on every batch shape its sampler
        takes, a relation prompt's contrasts included; each compiles once, here), so the first real request pays no
        first-call costs."""
        for model in self.models.values():
            began = time.perf_counter()
            condition, (text,) = example_inputs(model.pipeline, 1)
            conditions = warm_up_conditions(model.pipeline, condition) if model.runtime.buckets else [condition]
            for warming in conditions:
                for size in model.runtime.buckets or (max_batch_size,):
                    model.generate_batch([GenerateJob(condition=warming, seed=0, n=size)])
            if model.rewards:
                settings = model.pipeline.tteo.for_request(steps=1)
                job = RefineJob(
                    condition=condition, text=text, seed=0, n=max_batch_size, settings=settings, reward=model.rewards[0]
                )
                model.refine_batch([job])
            log.info("warmed %s at batch %d in %.2fs", model.name, max_batch_size, time.perf_counter() - began)
