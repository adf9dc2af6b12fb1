"""A training run's curve: its metrics.jsonl evaluations against training time across resumes, as a table."""

from __future__ import annotations

import json
from pathlib import Path


def training_curve(run_dir, evaluated_only: bool = True) -> list[dict]:
    """The evaluations a training run logged (metrics.jsonl), with minutes of training time at each.

    A resumed run logs again from its checkpoint's step; a step logged twice keeps its later record, and a
    resume whose clock started again from zero (older runs) continues from the time its checkpoint had."""
    records: dict[int, dict] = {}
    offset, previous = 0.0, 0
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record["step"]
        if step <= previous:  # a resume: the time at the checkpoint it went on from
            reached = 60 * records[step - 1]["minutes"] if step - 1 in records else 0.0
            offset = max(0.0, reached - record["elapsed_s"])
        previous = step
        records[step] = record | {"minutes": (offset + record["elapsed_s"]) / 60}
    evaluated = [
        r
        for _, r in sorted(records.items())
        if not evaluated_only or any(k.startswith(("pass", "recon_pass", "hard_negative")) for k in r)
    ]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "loss")} for r in evaluated]


def curve_table(run_dir) -> str:
    rows = training_curve(run_dir)
    if not rows:
        return f"{run_dir}: no evaluations logged"
    keys = [k for k in rows[0] if k not in ("step", "minutes")]
    lines = ["| step | minutes | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['minutes']:.1f} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in keys) + " |"
        )
    return "\n".join(lines)
