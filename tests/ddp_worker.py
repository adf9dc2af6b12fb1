"""A few steps of tiny teacher and distillation training, run alone or as one rank of `torchrun`: the DDP test
compares the parameters both ways reach. Under torchrun: `python -m torch.distributed.run ... ddp_worker.py BUNDLES OUT`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from tiny_bundles import tiny_tokenizer, tiny_transformer_config  # noqa: E402

from softdimo.bundle import read_bundle  # noqa: E402
from softdimo.conditioning import Conditioner  # noqa: E402
from softdimo.generator import GeneratorSettings  # noqa: E402
from softdimo.pipeline import load_pipeline, load_reward  # noqa: E402
from softdimo.sampler import SamplerSettings  # noqa: E402
from softdimo.train import distributed  # noqa: E402
from softdimo.train.distill import DistillParts, DistillTraining, train_distill  # noqa: E402
from softdimo.train.teacher import TeacherTraining, train_teacher  # noqa: E402

STEPS = 3
BATCH = 4  # the global batch: each of two processes takes 2 rows


def train_both(bundles: Path, runs: Path) -> dict[str, torch.Tensor]:
    """Parameters after STEPS steps of a tiny teacher and of a tiny distillation with its GAN and reward terms."""
    cpu = torch.device("cpu")
    conditioner = Conditioner.shapes_text()
    tokenizer = tiny_tokenizer()
    teacher = train_teacher(
        run_dir=runs / "teacher",
        tokenizer=tokenizer,
        conditioner=conditioner,
        cfg=tiny_transformer_config(conditioner, tokenizer.cfg.codebook_size),
        sampler=SamplerSettings(steps=2),
        device=cpu,
        training=TeacherTraining(steps=STEPS, batch_size=BATCH, warmup=1, eval_every=0),
    )
    pipeline = load_pipeline(bundles / "teacher-text")
    parts = DistillParts(
        teacher=pipeline.model,
        tokenizer=pipeline.tokenizer,
        conditioner=pipeline.conditioner,
        reward=load_reward(read_bundle(bundles / "reward")),
    )
    training = DistillTraining(
        steps=STEPS, batch_size=BATCH, warmup=1, gan_weight=0.5, reward_weight=0.5, eval_every=0, ema=0.0
    )
    student = train_distill(
        run_dir=runs / "distill", parts=parts, generator_settings=GeneratorSettings(), training=training, device=cpu
    )
    return {
        **{f"teacher.{k}": v for k, v in teacher.state_dict().items()},
        **{f"student.{k}": v for k, v in student.model.state_dict().items()},
    }


if __name__ == "__main__":
    bundles, out = Path(sys.argv[1]), Path(sys.argv[2])
    world = distributed.init(torch.device("cpu"))
    assert world.size == 2, "run me under torchrun with two processes"
    torch.set_num_threads(1)
    state = train_both(bundles, out / "runs")
    if world.is_main:
        save_file({k: v.contiguous() for k, v in state.items()}, out / "ddp.safetensors")
    distributed.close()
