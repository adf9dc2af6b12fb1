"""hey, a standard external HTTP load generator (Debian package `hey`): one round of load run as a child process, and
its per-request CSV read back as one answer per request."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import shutil
import time
from dataclasses import dataclass

from softdimo.bench_run import BenchError

PROGRAM = "hey"
PACKAGE = "hey"  # the Debian package that installs it
# The columns of `hey -o csv` this module reads (hey 0.1.4 writes these and five per-phase ones).
LATENCY_COLUMN, STATUS_COLUMN, OFFSET_COLUMN = "response-time", "status-code", "offset"


@dataclass(frozen=True)
class HeyAnswer:
    """One answered request as hey reports it."""

    latency_s: float  # from sending the request to the whole body read
    status: int
    sent_s: float  # when it was sent, from the start of the run


def require_hey() -> str:
    """The path of the hey program; a BenchError naming the package when it is not installed."""
    path = shutil.which(PROGRAM)
    if path is None:
        raise BenchError(f"--load-generator hey needs the `{PROGRAM}` program: apt-get install {PACKAGE}")
    return path


def hey_command(url: str, path: str, body: dict, *, concurrency: int, duration_s: float, timeout_s: float) -> list[str]:
    """hey posting `body` as JSON to `url + path` from `concurrency` workers for `duration_s`: a CSV row per answer."""
    return [
        require_hey(),
        "-z",
        f"{duration_s:g}s",
        "-c",
        str(concurrency),
        "-t",
        str(math.ceil(timeout_s)),
        "-m",
        "POST",
        "-T",
        "application/json",
        "-d",
        json.dumps(body),
        "-o",
        "csv",
        url + path,
    ]


def parse_csv(text: str) -> list[HeyAnswer]:
    """The answers in hey's CSV. hey lists only requests that got an HTTP answer: one that failed without one (a
    refused connection, its timeout) is not in it."""
    rows = csv.DictReader(io.StringIO(text))
    missing = {LATENCY_COLUMN, STATUS_COLUMN, OFFSET_COLUMN} - set(rows.fieldnames or ())
    if missing:
        raise BenchError(f"hey's output lacks the CSV columns {', '.join(sorted(missing))}: {text[:200]!r}")
    return [
        HeyAnswer(
            latency_s=float(row[LATENCY_COLUMN]), status=int(row[STATUS_COLUMN]), sent_s=float(row[OFFSET_COLUMN])
        )
        for row in rows
    ]


def answered_within_s(answers: list[HeyAnswer]) -> float:
    """The time from the start of the run to its last answer."""
    return max(answer.sent_s + answer.latency_s for answer in answers)


async def run_hey(
    url: str,
    path: str,
    body: dict,
    *,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
) -> tuple[list[HeyAnswer], float]:
    """One round of hey: every answer, and the round's wall time, from the run's start to its last answer (the hey
    process's own time when nothing was answered)."""
    command = hey_command(url, path, body, concurrency=concurrency, duration_s=duration_s, timeout_s=timeout_s)
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    wall = time.perf_counter() - began
    if process.returncode != 0:
        raise BenchError(f"hey exited with {process.returncode}: {err.decode(errors='replace')[-500:]}")
    answers = parse_csv(out.decode())
    return answers, answered_within_s(answers) if answers else wall
