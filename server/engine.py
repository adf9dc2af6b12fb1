"""The engine: loaded models on one device, and the batch functions the batchers call."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from softdimo.bundle import read_bundle
from softdimo.conditioning import Conditioner
from softdimo import shapes
from softdimo.pipeline import OneStepPipeline, TeacherPipeline, load_pipeline
from softdimo.tteo import TTEOSettings, candidate_seeds
from softdimo.vq import to_uint8

log = logging.getLogger("softdimo.engine")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


@dataclass(frozen=True)
class GenerateJob:
    """One request's work: its conditioning (one row), first seed, image count and sampling steps."""

    condition: torch.Tensor
    seed: int
    n: int
    steps: int | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def key(self) -> int | None:
        return self.steps


@dataclass(frozen=True)
class RefineJob:
    """One /refine request's work; requests batch together when their `settings` and reward agree."""

    condition: torch.Tensor
    text: str  # what the reward reads: the prompt, or a class-conditional model's class as a prompt
    seed: int
    n: int
    settings: TTEOSettings
    reward: str

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def key(self) -> tuple:
        return (self.settings, self.reward)


@dataclass
class RefinedImage:
    image: np.ndarray
    reward_before: float
    reward_after: float
    candidate_seed: int


@dataclass
class ServedModel:
    """A model the server answers for: its pipeline and what /v1/models says of it."""

    name: str
    kind: str  # "one-step" or "masked-diffusion"
    pipeline: TeacherPipeline | OneStepPipeline
    image_size: int
    defaults: dict = field(default_factory=dict)
    rewards: list[str] = field(default_factory=list)

    @property
    def conditioner(self) -> Conditioner:
        return self.pipeline.conditioner

    @property
    def conditioning(self) -> str:
        return self.conditioner.conditioning

    def card(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "conditioning": self.conditioning, "image_size": self.image_size,
            "classes": self.conditioner.class_names or None, "rewards": self.rewards, "default": self.defaults,
        }  # fmt: skip

    def generate_batch(self, jobs: Sequence[GenerateJob]) -> list[list[np.ndarray]]:
        """All jobs of one batch in one pass (they share `steps`); returns each job's images."""
        condition = torch.cat([job.condition.expand(job.n, *job.condition.shape[1:]) for job in jobs])
        seeds = [s for job in jobs for s in job.seeds]
        images = self.pipeline.generate(condition, seeds, steps=jobs[0].steps)
        return _split(list(images), [job.n for job in jobs])

    def reward_text(self, prompt: str | None, class_label: int | None) -> str:
        return prompt if prompt is not None else shapes.class_prompt(class_label).text()

    def refine_batch(self, jobs: Sequence[RefineJob]) -> list[list[RefinedImage]]:
        """TTEO for all jobs of one batch at once (they share settings and reward); each image on its own."""
        condition = torch.cat([job.condition.expand(job.n, *job.condition.shape[1:]) for job in jobs])
        texts = [job.text for job in jobs for _ in range(job.n)]
        best_of = jobs[0].settings.best_of
        candidates = [row for job in jobs for row in candidate_seeds(job.seeds, best_of)]  # per request, not per batch
        refined = self.pipeline.refine(condition, texts, candidates, jobs[0].settings, reward=jobs[0].reward)
        images = to_uint8(refined.images)
        before, after = refined.reward_before.tolist(), refined.reward_after.tolist()
        items = [RefinedImage(images[i], before[i], after[i], refined.seeds[i]) for i in range(len(candidates))]
        return _split(items, [job.n for job in jobs])


def _split(items: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for count in counts:
        out.append(items[start : start + count])
        start += count
    return out


def load_model(path: str | Path, device: torch.device) -> ServedModel:
    bundle = read_bundle(path)
    pipeline = load_pipeline(path, device)
    kind = bundle.config["kind"]
    if kind == "masked-diffusion":
        defaults, rewards = {"steps": pipeline.sampler.steps, "guidance": pipeline.sampler.guidance}, []
    else:
        tteo = pipeline.tteo
        defaults = {"refine": {"steps": tteo.steps, "lr": tteo.lr, "best_of": tteo.best_of, "reward": pipeline.default_reward}}
        rewards = list(pipeline.rewards)
    return ServedModel(
        name=bundle.config["name"], kind=kind, pipeline=pipeline, image_size=pipeline.tokenizer.cfg.image_size,
        defaults=defaults, rewards=rewards,
    )  # fmt: skip


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
    def load(cls, paths: Sequence[str], device_name: str) -> Engine:
        device = resolve_device(device_name)
        torch.set_grad_enabled(False)
        models = []
        for path in paths:
            began = time.perf_counter()
            models.append(load_model(path, device))
            log.info("loaded %s from %s on %s in %.2fs", models[-1].name, path, device, time.perf_counter() - began)
        return cls(models, device)

    def warm_up(self, max_batch_size: int) -> None:
        """Run every model once at the largest batch, so the first real request pays no first-call costs."""
        for model in self.models.values():
            began = time.perf_counter()
            condition = self._example_condition(model)
            model.generate_batch([GenerateJob(condition=condition, seed=0, n=max_batch_size)])
            if model.rewards:
                settings = TTEOSettings(steps=1)
                text = "a red circle"
                model.refine_batch([RefineJob(condition=condition, text=text, seed=0, n=max_batch_size, settings=settings, reward=model.rewards[0])])
            log.info("warmed %s at batch %d in %.2fs", model.name, max_batch_size, time.perf_counter() - began)

    @staticmethod
    def _example_condition(model: ServedModel) -> torch.Tensor:
        if model.conditioning == "text":
            return model.conditioner.encode_prompts(["a red circle"])
        return model.conditioner.encode_labels([0])
