"""Training past one process: two gloo processes under torchrun reach the parameters one process reaches on the same
global batch, for the teacher and for distillation (generator, auxiliary model and discriminator heads)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softdimo.train.distributed import World

TESTS = Path(__file__).resolve().parents[1]


def test_each_rank_takes_an_even_share_of_the_global_batch():
    assert World().rows(6) == slice(None)
    shares = [World(rank=r, size=3).rows(6) for r in range(3)]
    assert [list(range(6))[s] for s in shares] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="does not split evenly"):
        World(rank=0, size=4).rows(6)


def test_two_processes_train_the_teacher_and_the_student_as_one_process_does(tmp_path):
    import os

    from ddp_worker import STEPS, train_both
    from tiny_bundles import write_all

    bundles = tmp_path / "bundles"
    write_all(bundles)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(TESTS / "ddp_worker.py"),
        str(bundles),
        str(tmp_path / "ddp"),
    ]
    (tmp_path / "ddp").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    alone = train_both(bundles, tmp_path / "alone")
    together = load_file(tmp_path / "ddp" / "ddp.safetensors")
    assert alone.keys() == together.keys()
    # The last bias of `code_out` adds one value to every logit of a position, which softmax ignores: its gradient is
    # zero but for rounding, and Adam scales any gradient to a step of about lr, so it drifts apart by rounding alone.
    gauge = {f"{model}.code_out.2.bias" for model in ("teacher", "student")}
    for name, value in alone.items():
        if name not in gauge:  # equal up to the order in which gradients are summed over the two halves of the batch
            assert torch.allclose(value, together[name], rtol=1e-4, atol=1e-6), name
    # and training moved them: the student's blocks left the teacher's weights (ema 0: the EMA is the student)
    start = load_file(bundles / "teacher-text" / "transformer.safetensors")
    trained = [
        k for k in start if k.startswith("blocks") and not torch.allclose(together[f"student.{k}"], start[k], atol=1e-6)
    ]
    assert len(trained) > len([k for k in start if k.startswith("blocks")]) // 2
    assert (
        len((tmp_path / "ddp" / "runs" / "distill" / "metrics.jsonl").read_text().splitlines()) == STEPS
    )  # rank 0 logs alone
