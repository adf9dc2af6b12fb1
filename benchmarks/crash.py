"""`softdimo crash`: `kill -9` of a busy `softdimo serve` again and again, each restart on the same SQLite job store,
then the last server left to finish; and an account of every job accepted: succeeded, failed, or lost."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx

from benchmarks.job_ledger import JobLedger, JobTally
from benchmarks.load import target_for
from benchmarks.running import server_process
from server.job_store import RUNNING, SUCCEEDED, SQLiteJobStore
from softdimo.bench_run import BenchError, check_options

POLL_S = 0.2  # how often the store is read while waiting for a job to run
FINISH_POLL_S = 1.0  # how often the jobs not yet final are read while the last server finishes them


@dataclass(frozen=True, kw_only=True)
class CrashPlan:
    """The servers `softdimo crash` starts, the jobs it gives each, and when it kills them."""

    weights: tuple[str, ...]
    kills: int = 5
    device: str = "auto"
    job_db_path: str | None = None  # None: a file in a temporary folder, removed at the end
    refine_jobs: int = 3  # /refine jobs submitted to each server before its kill
    generate_jobs: int = 2  # /generate jobs likewise
    images: int = 4  # per job
    tteo_steps: int = 200  # per /refine job: enough to be running when the kill comes
    job_concurrency: int = 2
    job_lease_s: float = 5.0  # under a restart's time, so the next server takes the killed one's jobs at once
    kill_delay_s: float = 1.0  # the kill comes a uniform draw of up to this long after a job starts running
    running_timeout_s: float = 300.0  # longest wait for a job to start running on a server
    finish_timeout_s: float = 1800.0  # longest wait for the last server to finish every job
    ready_timeout_s: float = 300.0
    seed: int = 0

    def __post_init__(self):
        check_options(
            positive={
                "refine_jobs": self.refine_jobs,
                "images": self.images,
                "tteo_steps": self.tteo_steps,
                "job_concurrency": self.job_concurrency,
                "job_lease_s": self.job_lease_s,
            },
            non_negative={"kills": self.kills, "generate_jobs": self.generate_jobs, "kill_delay_s": self.kill_delay_s},
        )

    @property
    def job_max_attempts(self) -> int:
        """Runs a job is allowed: one running at every kill runs kills + 1 times, and must not be failed for it."""
        return self.kills + 1

    def serve_arguments(self, store: Path) -> list[str]:
        return [
            "--weights",
            *self.weights,
            "--device",
            self.device,
            "--job-db-path",
            str(store),
            "--job-concurrency",
            str(self.job_concurrency),
            "--job-lease-s",
            str(self.job_lease_s),
            "--job-max-attempts",
            str(self.job_max_attempts),
            "--log-level",
            "warning",
        ]


@dataclass
class CrashReport:
    """What `softdimo crash` did and found: its kills, and every job accepted by the status it ended in."""

    weights: list[str]
    kills_planned: int
    kills: int  # servers that exited by the SIGKILL sent to them
    running_at_kill: list[int]  # jobs the store held as running by each killed server just before its kill
    jobs: JobTally  # every job accepted, by its status once the last server was done (unfinished: lost)
    rerun: int  # succeeded jobs that ran more than once: a kill stopped an earlier run (the store's attempts)
    most_runs: int  # the most times one job was started; past job_max_attempts it fails
    job_max_attempts: int
    job_lease_s: float
    finish_s: float  # the last server's time from ready to every job final (or to finish_timeout_s)
    wall_s: float
    lost_jobs: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.jobs.unfinished

    def as_dict(self) -> dict:
        return {**asdict(self), "lost": self.lost}

    def text(self) -> str:
        return "\n".join(
            [
                f"crash of softdimo serve --weights {' '.join(self.weights)}: {self.kills} of {self.kills_planned} "
                "kill -9 done, each followed by a restart on the same job store "
                f"(--job-max-attempts {self.job_max_attempts}, --job-lease-s {self.job_lease_s:g})",
                "jobs running at each kill: " + (", ".join(map(str, self.running_at_kill)) or "no kill"),
                f"jobs: {self.jobs.text()}",
                f"succeeded after more than one run (a kill stopped an earlier run): {self.rerun}; "
                f"the most runs of one job: {self.most_runs}",
                f"jobs lost: {self.lost}" + (f" ({', '.join(self.lost_jobs)})" if self.lost_jobs else ""),
                f"the last server finished the rest in {self.finish_s:.0f}s; wall time {self.wall_s:.0f}s",
            ]
        )


def run_crash(plan: CrashPlan, say: Callable[[str], None] = lambda line: None) -> CrashReport:
    """Start `softdimo serve`, submit jobs, wait until one runs, SIGKILL the server; `plan.kills` times on one store.
    Then start it once more and wait until every accepted job is final. `say` hears a line after each kill."""
    began = time.monotonic()
    rng = random.Random(plan.seed)
    seeds = itertools.count(plan.seed * 1_000_000)
    ledger = JobLedger()
    running_at_kill: list[int] = []
    dead_workers: set[str] = set()  # the killed servers, as the store names the holder of a running job
    kills = 0
    with _store_path(plan.job_db_path) as path:
        store = SQLiteJobStore(path)
        try:
            for kill in range(1, plan.kills + 1):
                with _server(plan, path, graceful_stop=False) as (process, client):
                    bodies = _job_bodies(client.get("/v1/models").json()["data"], plan, seeds)
                    rng.shuffle(bodies)
                    for body in bodies:
                        _submit(client, ledger, body)
                    worker = _wait_for_a_running_job(store, ledger.ids, dead_workers, timeout_s=plan.running_timeout_s)
                    time.sleep(rng.uniform(0, plan.kill_delay_s))
                    running = [job_id for job_id, w in _running_jobs(store, ledger.ids).items() if w == worker]
                    process.kill()
                    kills += process.wait(timeout=60) == -signal.SIGKILL
                dead_workers.add(worker)
                running_at_kill.append(len(running))
                say(f"kill {kill} of {plan.kills}: {len(running)} jobs were running, {len(ledger.ids)} accepted so far")
            with _server(plan, path, graceful_stop=True) as (_, client):
                finish_s = _wait_until_final(client, ledger, timeout_s=plan.finish_timeout_s)
            runs = {job_id: store.get(job_id).attempts for job_id in ledger.ids}
        finally:
            store.close()
    return CrashReport(
        weights=list(plan.weights),
        kills_planned=plan.kills,
        kills=kills,
        running_at_kill=running_at_kill,
        jobs=ledger.tally(),
        rerun=sum(runs[job_id] > 1 for job_id in ledger.ids if ledger.last(job_id)["status"] == SUCCEEDED),
        most_runs=max(runs.values(), default=0),
        job_max_attempts=plan.job_max_attempts,
        job_lease_s=plan.job_lease_s,
        finish_s=finish_s,
        wall_s=time.monotonic() - began,
        lost_jobs=ledger.unfinished(),
    )


@contextmanager
def _store_path(job_db_path: str | None) -> Iterator[Path]:
    if job_db_path is not None:
        yield Path(job_db_path)
        return
    with tempfile.TemporaryDirectory(prefix="softdimo-crash-") as folder:
        yield Path(folder) / "jobs.sqlite3"


@contextmanager
def _server(plan: CrashPlan, store: Path, *, graceful_stop: bool):
    """`softdimo serve` on `store` in a child process; yields it and a client of its URL."""
    # SOFTDIMO_* settings of the calling shell (an API key, another job store) would change what is tested.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTDIMO_")}
    with server_process(
        plan.serve_arguments(store), env=env, ready_timeout_s=plan.ready_timeout_s, graceful_stop=graceful_stop
    ) as (process, url):
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
            yield process, client


def _job_bodies(cards: list[dict], plan: CrashPlan, seeds: Iterator[int]) -> list[dict]:
    """`plan.refine_jobs` long /refine jobs on the first model with a reward, `plan.generate_jobs` /generate jobs
    over the models in turn; each with a seed of its own."""
    refiners = [card for card in cards if card.get("rewards")]
    if not refiners:
        raise BenchError("none of the models has a reward: the jobs that keep the server busy are /refine jobs")
    refine = {**target_for(refiners[0], "/refine", plan.tteo_steps).body, "endpoint": "refine", "n": plan.images}
    generate = [{**target_for(card, "/generate").body, "endpoint": "generate", "n": plan.images} for card in cards]
    bodies = [refine] * plan.refine_jobs + list(itertools.islice(itertools.cycle(generate), plan.generate_jobs))
    return [{**body, "seed": next(seeds)} for body in bodies]


def _submit(client: httpx.Client, ledger: JobLedger, body: dict) -> None:
    answer = client.post("/v1/jobs", json=body)
    if answer.status_code != 202:
        raise BenchError(f"a job was refused: {answer.status_code} {answer.text[:200]}")
    ledger.accept(answer.json()["id"])


def _running_jobs(store: SQLiteJobStore, job_ids: list[str]) -> dict[str, str]:
    """Each of these jobs the store holds as running, with its worker: the server process that claimed it. A killed
    server's jobs stay running under its worker until the next server takes them."""
    running = {}
    for job_id in job_ids:
        job = store.get(job_id)
        if job is not None and job.status == RUNNING:
            running[job_id] = job.worker
    return running


def _wait_for_a_running_job(
    store: SQLiteJobStore, job_ids: list[str], dead_workers: set[str], *, timeout_s: float
) -> str:
    """Wait until a live server runs one of the jobs; returns its worker."""
    deadline = time.monotonic() + timeout_s
    while not (live := set(_running_jobs(store, job_ids).values()) - dead_workers):
        if time.monotonic() > deadline:
            raise BenchError(f"no job started running within {timeout_s:g}s")
        time.sleep(POLL_S)
    return live.pop()


def _read_unfinished(client: httpx.Client, ledger: JobLedger) -> None:
    """Read every job not yet final as GET /v1/jobs/{id} answers it."""
    for job_id in ledger.unfinished():
        answer = client.get(f"/v1/jobs/{job_id}")
        if answer.status_code == 200:
            ledger.record(answer.json())


def _wait_until_final(client: httpx.Client, ledger: JobLedger, *, timeout_s: float) -> float:
    """Read the jobs not yet final every FINISH_POLL_S until none is left or `timeout_s` has passed; the seconds."""
    began = time.monotonic()
    _read_unfinished(client, ledger)
    while ledger.unfinished() and time.monotonic() - began < timeout_s:
        time.sleep(FINISH_POLL_S)
        _read_unfinished(client, ledger)
    return time.monotonic() - began


def write_report(report: CrashReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.as_dict(), f, indent=2)
        f.write("\n")
