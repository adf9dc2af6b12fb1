"""The options every server benchmark suite shares, and the server spec and load they make."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from benchmarks.load import Load
from benchmarks.server_under_test import ServerSpec
from softdimo.bench_run import BenchError, RuntimeOptions, check_options
from softdimo.bundle import read_bundle
from softdimo.runtime import RuntimeSettings


@dataclass(frozen=True, kw_only=True)
class ServerBench(RuntimeOptions):
    device: str = "auto"
    max_batch_size: int = 16  # the batched server's --max-batch-size
    max_wait_ms: float | None = None  # None: the server's default
    duration_s: float = 10.0  # measured time per load level
    warmup_s: float = 2.0  # warm-up per load level, dropped
    max_requests: int = 100_000  # per round, whatever the duration
    timeout_s: float = 120.0  # per request, client-side
    repeats: int = 5  # timed calls of each offline measurement (median)
    server: str = "process"  # "process" or "thread"

    def __post_init__(self):
        super().__post_init__()
        positive = {
            "max_batch_size": self.max_batch_size,
            "duration_s": self.duration_s,
            "max_requests": self.max_requests,
            "timeout_s": self.timeout_s,
            "repeats": self.repeats,
            "max_wait_ms": self.max_wait_ms,
        }
        check_options(positive=positive, non_negative={"warmup_s": self.warmup_s})

    def runtime(self) -> RuntimeSettings:
        """The one runtime of a suite that compares nothing but what it names (bench steps, bench refine)."""
        arms = self.arms({})
        if len(arms) > 1:
            raise BenchError("two runtime settings are compared by bench serve or bench offline; give one value here")
        return arms[0]["runtime"]

    def spec(
        self, weights: Sequence[str], max_batch_size: int, runtime: RuntimeSettings = RuntimeSettings()
    ) -> ServerSpec:
        absolute = tuple(str(Path(w).resolve()) for w in weights)
        return ServerSpec(
            weights=absolute,
            device=self.device,
            max_batch_size=max_batch_size,
            max_wait_ms=self.max_wait_ms,
            mode=self.server,
            runtime=runtime,
        )

    def load(self, concurrency: int) -> Load:
        return Load(
            concurrency=concurrency,
            duration_s=self.duration_s,
            warmup_s=self.warmup_s,
            max_requests=self.max_requests,
            timeout_s=self.timeout_s,
        )


def model_info(path: str) -> dict:
    config = read_bundle(path).config
    return {"path": str(path), "name": config["name"], "kind": config["kind"]}
