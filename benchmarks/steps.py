"""`softdimo bench steps`: the one-step model against its teacher at each sampling-steps value, through one server."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from benchmarks.load import BUILTIN, LOAD_GENERATORS, run_load, target_for
from benchmarks.options import ServerBench, model_info
from benchmarks.server_under_test import model_cards, running_server
from softdimo.bench_run import BenchError, check_options, machine_header, machine_info
from softdimo.device import resolve_device
from softdimo.tables import markdown_table
from softdimo.timing import ratio


@dataclass(frozen=True, kw_only=True)
class StepsBench(ServerBench):
    one_step: str
    teacher: str
    steps: tuple[int, ...] = (4, 8, 16)
    concurrency: int = 16

    def __post_init__(self):
        super().__post_init__()
        check_options(positive={"steps": self.steps, "concurrency": self.concurrency})


def run_steps(config: StepsBench, command: str) -> dict:
    """Images/s of the one-step model and of the teacher at each steps value, both served by one server."""
    device = resolve_device(config.device)
    one_step, teacher = model_info(config.one_step), model_info(config.teacher)
    if teacher["kind"] != "masked-diffusion":
        raise BenchError(f"--teacher {config.teacher} is {teacher['kind']}, not a masked-diffusion bundle")
    with running_server(config.spec([config.one_step, config.teacher], config.max_batch_size, config.runtime())) as url:
        cards = model_cards(url)
        load = config.load(config.concurrency)
        fast = asyncio.run(run_load(url, target_for(cards[one_step["name"]], "/generate"), load))
        slow = {
            s: asyncio.run(run_load(url, target_for(cards[teacher["name"]], "/generate", s), load))
            for s in config.steps
        }
    rows = [
        {
            "steps": s,
            "one_step_images_per_s": fast["images_per_s"],
            "teacher_images_per_s": slow[s]["images_per_s"],
            "ratio": ratio(fast["images_per_s"], slow[s]["images_per_s"]),
        }
        for s in config.steps
    ]
    return {
        "bench": "steps",
        "machine": machine_info(device, command),
        "config": asdict(config),
        "one_step": {**one_step, "load": fast},
        "teacher": {**teacher, "loads": [{"steps": s, **slow[s]} for s in config.steps]},
        "rows": rows,
    }


def steps_table(result: dict) -> str:
    fast = result["one_step"]["load"]
    slow = {load["steps"]: load for load in result["teacher"]["loads"]}
    rows = [
        [
            r["steps"],
            r["one_step_images_per_s"],
            r["teacher_images_per_s"],
            r["ratio"],
            fast["latency_ms"]["p50"],
            slow[r["steps"]]["latency_ms"]["p50"],
        ]
        for r in result["rows"]
    ]
    columns = ["teacher steps", "one-step images/s", "teacher images/s", "ratio", "one-step p50 ms", "teacher p50 ms"]
    table = markdown_table(columns, rows)
    cfg = result["config"]
    return (
        f"{machine_header(result['machine'])}\n\n`{result['one_step']['name']}` against `{result['teacher']['name']}` "
        f"through one server (--max-batch-size {cfg['max_batch_size']}), concurrency {cfg['concurrency']}, "
        f"{cfg['duration_s']:g} s per model and steps value; load: {LOAD_GENERATORS[BUILTIN]}.\n\n{table}\n"
    )
