"""What every benchmark suite shares: option checks, arms to compare, the run's record (machine, command, JSON)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from softdimo.runtime import RuntimeSettings

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class BenchError(ValueError):
    """A benchmark that cannot run as asked (a wrong bundle kind, a missing device, a server that never got ready)."""


def check_options(*, positive: dict, non_negative: dict | None = None) -> None:
    """Options by their flag names (underscores for dashes); a value may be a number, a sequence of them, or None
    (unset)."""
    for bound, values in ((0, positive), (-1, non_negative or {})):
        for name, value in values.items():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None and v <= bound:
                    raise BenchError(
                        f"--{name.replace('_', '-')} must be {'positive' if bound == 0 else '0 or more'}, got {v}"
                    )


def arm_values(options: dict[str, tuple]) -> list[dict]:
    """Options given one value hold for every arm; an option given two compares them: arm A takes the first, B the
    second."""
    count = max(len(values) for values in options.values())
    for name, values in options.items():
        if len(values) not in (1, count) or len(values) > 2:
            raise BenchError(f"--{name.replace('_', '-')} takes one value, or two to compare; got {len(values)}")
    return [{name: values[min(i, len(values) - 1)] for name, values in options.items()} for i in range(count)]


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """How a benchmark's models run (softdimo.runtime): each option one value for every arm, or two to compare."""

    precision: tuple[str, ...] = (RuntimeSettings.precision,)
    compile: tuple[str, ...] = ("on" if RuntimeSettings.compile else "off",)
    pin_memory: tuple[str, ...] = ("on" if RuntimeSettings.pin_memory else "off",)
    rounds: int = 5  # comparisons: interleaved timed rounds per arm at each batch size or load level

    def __post_init__(self):
        check_options(positive={"rounds": self.rounds})
        for name in ("compile", "pin_memory"):
            if set(getattr(self, name)) - {"on", "off"}:
                raise BenchError(f"--{name.replace('_', '-')} takes on or off")

    def arms(self, what: dict[str, tuple]) -> list[dict]:
        """The arms named by `what` runs (e.g. {"model": (a, b)}) and the runtime options: one dict each, its
        runtime a RuntimeSettings. Raises BenchError for three values, or two against three, or an unknown precision."""
        options = {**what, "precision": self.precision, "compile": self.compile, "pin_memory": self.pin_memory}
        arms = []
        for v in arm_values(options):
            try:
                runtime = RuntimeSettings(
                    precision=v["precision"], compile=v["compile"] == "on", pin_memory=v["pin_memory"] == "on"
                )
            except ValueError as exc:  # a precision RuntimeSettings does not know
                raise BenchError(f"--{exc}") from exc
            arms.append({**{name: v[name] for name in what}, "runtime": runtime})
        return arms


def runtime_words(runtime: dict) -> str:
    """A RuntimeSettings dict as a table says it: `bf16, compiled`."""
    words = [runtime["precision"]] + ["compiled"] * runtime["compile"] + ["pinned"] * runtime["pin_memory"]
    return ", ".join(words)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, command: str) -> dict:
    """What a reader needs to compare two runs: hardware, software, device, date and the command."""
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def command_line(words: Sequence[str], options: Sequence[tuple[str, object]]) -> str:
    """`softdimo bench …` with every option spelled out (defaults included), so rerunning it repeats the run."""
    parts = list(words)
    for flag, value in options:
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def machine_header(machine: dict) -> str:
    """The two lines above every table: where and how the numbers were measured."""
    hardware = machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_count']} CPUs"
    return (
        f"**machine** {hardware} · torch {machine['torch']} ({machine['torch_threads']} threads) · "
        f"device {machine['device']} · {machine['date']}  \n**command** `{machine['command']}`"
    )


def write_json(result: dict, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
