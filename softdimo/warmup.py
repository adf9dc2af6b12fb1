"""The fixed request that warm-ups and benchmarks send, and the conditionings that warm each batch shape of a model."""

from __future__ import annotations

import torch

from softdimo.pipeline import OneStepPipeline, TeacherPipeline

EXAMPLE_PROMPT = "a red circle"
CONTRAST_EXAMPLE_PROMPT = "a red circle left of a blue square"  # a prompt with contrasts (Conditioner.contrasts)


def example_inputs(pipeline: TeacherPipeline | OneStepPipeline, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """A batch of one fixed request: conditioning (B, ...) and the text a reward reads. Cost does not depend on
    content."""
    conditioner = pipeline.conditioner
    prompt, label = (EXAMPLE_PROMPT, None) if conditioner.conditioning == "text" else (None, 0)
    condition = conditioner.request(prompt, label)
    return condition.expand(batch_size, *condition.shape[1:]), [conditioner.reward_text(prompt, label)] * batch_size


def warm_up_conditions(pipeline: TeacherPipeline | OneStepPipeline, example: torch.Tensor) -> list[torch.Tensor]:
    """One request's conditioning (1, ...) for each shape a model's sampling batches take: `example` (example_inputs'),
    and where the sampler guides prompts away from their contrasts, a prompt that has them (its batch runs a third
    condition)."""
    conditions = [example]
    if getattr(getattr(pipeline, "sampler", None), "contrast", False):
        conditions.append(pipeline.conditioner.request(CONTRAST_EXAMPLE_PROMPT, None))
    return conditions
