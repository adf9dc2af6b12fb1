"""The jobs a client had accepted (POST /v1/jobs answered 202), the last state it read of each, and their tally."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from server.job_store import CANCELLED, FAILED, FINISHED, QUEUED, SUCCEEDED


@dataclass(frozen=True)
class JobTally:
    """Accepted jobs by their last status read; every accepted job is in exactly one of the other counts."""

    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    unfinished: int = 0  # accepted and not final when last read: lost, unless they finish later
    errors: dict[str, int] = field(default_factory=dict)  # failed jobs by their error's HTTP status

    def text(self) -> str:
        errors = ", ".join(f"{status} x{count}" for status, count in sorted(self.errors.items()))
        return (
            f"{self.accepted} accepted; {self.succeeded} succeeded, {self.failed} failed"
            + (f" ({errors})" if errors else "")
            + f", {self.cancelled} cancelled, {self.unfinished} unfinished"
        )


class JobLedger:
    """Each accepted job's id and the status, progress and error last read for it (never its result)."""

    def __init__(self) -> None:
        self._last: dict[str, dict] = {}

    def accept(self, job_id: str) -> None:
        self._last[job_id] = {"id": job_id, "status": QUEUED, "progress": None, "error": None}

    def record(self, job: dict) -> None:
        """Keep what GET /v1/jobs/{id} answered for a job this ledger accepted."""
        self._last[job["id"]] = {key: job.get(key) for key in ("id", "status", "progress", "error")}

    def last(self, job_id: str) -> dict:
        return self._last[job_id]

    def is_final(self, job_id: str) -> bool:
        return self._last[job_id]["status"] in FINISHED

    @property
    def ids(self) -> list[str]:
        return list(self._last)

    def unfinished(self) -> list[str]:
        return [job_id for job_id in self._last if not self.is_final(job_id)]

    def tally(self) -> JobTally:
        statuses = Counter(job["status"] for job in self._last.values())
        errors = Counter(
            str((job["error"] or {}).get("status")) for job in self._last.values() if job["status"] == FAILED
        )
        return JobTally(
            accepted=len(self._last),
            succeeded=statuses[SUCCEEDED],
            failed=statuses[FAILED],
            cancelled=statuses[CANCELLED],
            unfinished=sum(count for status, count in statuses.items() if status not in FINISHED),
            errors=dict(errors),
        )
