"""Images for a list of Shapes prompts from any pipeline, in batches, run plainly or through a Runtime."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from softdimo import shapes


def generate_for_prompts(
    pipeline,
    prompts: Sequence[shapes.Prompt],
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    batch: int = 50,
    runtime=None,
) -> list[np.ndarray]:
    """Images for Shapes prompts in batches, run plainly or through a softdimo.runtime.Runtime (bf16, compiled).

    `pipeline` is any pipeline: a `conditioner` with `for_prompt`, and `generate(condition, seeds, steps)`."""
    seeds = list(seeds)
    images: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        condition = torch.cat([pipeline.conditioner.for_prompt(p)[0] for p in prompts[i : i + batch]])
        part = seeds[i : i + batch]
        images.extend(
            pipeline.generate(condition, part, steps)
            if runtime is None
            else runtime.generate(pipeline, condition, part, steps)
        )
    return images
