"""Where durable jobs live: the JobStore interface, with SQLite (one file, the default) and Redis implementations."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class JobRecord:
    """One job as stored. `body` is the request body with its seed fixed at submit time, so that a job run
    again after a crash draws the same images. `worker` and `lease_until` say which process runs it, until when."""

    id: str
    endpoint: str  # "generate" or "refine"
    body: dict
    created: float
    status: str = QUEUED
    webhook: str | None = None
    owner: str | None = None  # a digest of the API key that submitted it, when a key is configured
    progress: dict | None = None
    result: dict | None = None
    error: dict | None = None
    worker: str | None = None
    lease_until: float = 0.0
    attempts: int = 0


class JobStore(Protocol):
    """Durable job state shared by every process serving the same store. Methods block (call them off the loop);
    `worker` arguments make updates conditional on the caller still holding the job's lease."""

    def add(self, job: JobRecord, *, max_queued_per_owner: int | None) -> bool:
        """Store a queued job; False (nothing stored) when its owner already has `max_queued_per_owner` queued."""

    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when unknown or expired."""

    def claim(self, *, worker: str, lease_s: float) -> JobRecord | None:
        """The oldest queued job, or a running one whose lease ran out (its process died), now running for `worker`."""

    def renew(self, job_id: str, *, worker: str, lease_s: float) -> str:
        """Extend the lease; the job's status, or "lost" when another worker holds it (or it expired)."""

    def set_progress(self, job_id: str, *, worker: str, progress: dict) -> None: ...

    def finish(
        self, job_id: str, *, worker: str, status: str, result: dict | None, error: dict | None, ttl_s: float
    ) -> bool:
        """Record the outcome, kept for `ttl_s`; False when the job was cancelled or taken over meanwhile."""

    def release(self, job_id: str, *, worker: str) -> None:
        """Put a running job back at the head of the queue (a drain that could not finish it), its attempt not
        counted."""

    def cancel(self, job_id: str, *, ttl_s: float) -> JobRecord | None:
        """Mark a queued or running job cancelled; the job as it now stands, or None when unknown."""

    def count_queued(self, owner: str) -> int: ...

    def count_all_queued(self) -> int:
        """Jobs waiting to be claimed, whoever submitted them: the backlog every process sharing the store sees."""

    def purge_expired(self) -> int:
        """Delete finished jobs past their expiry; how many."""

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    webhook TEXT,
    owner TEXT,
    progress TEXT,
    result TEXT,
    error TEXT,
    worker TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_waiting ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, status);
"""
_COLUMNS = "id, endpoint, body, created, status, webhook, owner, progress, result, error, worker, lease_until, attempts"


def _loads(text: str | None) -> dict | None:
    return None if text is None else json.loads(text)


def _dumps(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


class SQLiteJobStore:
    """Jobs in one SQLite file in WAL mode: processes on one machine may share it; writes take the file's lock."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a process crash
            self._db.executescript(_SCHEMA)

    def _record(self, row) -> JobRecord:
        job_id, endpoint, body, created, status, webhook, owner, progress, result, error, worker, lease, attempts = row
        return JobRecord(
            id=job_id,
            endpoint=endpoint,
            body=json.loads(body),
            created=created,
            status=status,
            webhook=webhook,
            owner=owner,
            progress=_loads(progress),
            result=_loads(result),
            error=_loads(error),
            worker=worker,
            lease_until=lease,
            attempts=attempts,
        )

    def _transaction(self, work):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = work(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    def add(self, job: JobRecord, *, max_queued_per_owner: int | None) -> bool:
        def add(db):
            if max_queued_per_owner is not None and job.owner is not None:
                (queued,) = db.execute(
                    "SELECT count(*) FROM jobs WHERE owner = ? AND status = ?", (job.owner, QUEUED)
                ).fetchone()
                if queued >= max_queued_per_owner:
                    return False
            db.execute(
                "INSERT INTO jobs (id, endpoint, body, created, status, webhook, owner) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.endpoint, _dumps(job.body), job.created, QUEUED, job.webhook, job.owner),
            )
            return True

        return self._transaction(add)

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
                (job_id, time.time()),
            ).fetchone()
        return None if row is None else self._record(row)

    def claim(self, *, worker: str, lease_s: float) -> JobRecord | None:
        def claim(db):
            now = time.time()
            row = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status = ? OR (status = ? AND lease_until < ?)"
                " ORDER BY seq LIMIT 1",
                (QUEUED, RUNNING, now),
            ).fetchone()
            if row is None:
                return None
            job = self._record(row)
            job.status, job.worker, job.lease_until, job.attempts = RUNNING, worker, now + lease_s, job.attempts + 1
            db.execute(
                "UPDATE jobs SET status = ?, worker = ?, lease_until = ?, attempts = ? WHERE id = ?",
                (RUNNING, worker, job.lease_until, job.attempts, job.id),
            )
            return job

        return self._transaction(claim)

    def renew(self, job_id: str, *, worker: str, lease_s: float) -> str:
        def renew(db):
            row = db.execute("SELECT status, worker FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return "lost"
            status, holder = row
            if status == RUNNING and holder != worker:
                return "lost"
            if status == RUNNING:
                db.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (time.time() + lease_s, job_id))
            return status

        return self._transaction(renew)

    def set_progress(self, job_id: str, *, worker: str, progress: dict) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET progress = ? WHERE id = ? AND status = ? AND worker = ?",
                (_dumps(progress), job_id, RUNNING, worker),
            )

    def finish(
        self, job_id: str, *, worker: str, status: str, result: dict | None, error: dict | None, ttl_s: float
    ) -> bool:
        with self._lock:
            changed = self._db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, expires_at = ?"
                " WHERE id = ? AND status = ? AND worker = ?",
                (status, _dumps(result), _dumps(error), time.time() + ttl_s, job_id, RUNNING, worker),
            ).rowcount
        return changed == 1

    def release(self, job_id: str, *, worker: str) -> None:
        with self._lock:
            # Negative seq puts it ahead of every job queued so far: it was accepted before them.
            self._db.execute(
                "UPDATE jobs SET status = ?, worker = NULL, lease_until = 0, seq = -seq, attempts = attempts - 1"
                " WHERE id = ? AND status = ? AND worker = ?",
                (QUEUED, job_id, RUNNING, worker),
            )

    def cancel(self, job_id: str, *, ttl_s: float) -> JobRecord | None:
        def cancel(db):
            db.execute(
                "UPDATE jobs SET status = ?, expires_at = ? WHERE id = ? AND status IN (?, ?)",
                (CANCELLED, time.time() + ttl_s, job_id, QUEUED, RUNNING),
            )
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else self._record(row)

        return self._transaction(cancel)

    def count_queued(self, owner: str) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT count(*) FROM jobs WHERE owner = ? AND status = ?", (owner, QUEUED)
            ).fetchone()[0]

    def count_all_queued(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM jobs WHERE status = ?", (QUEUED,)).fetchone()[0]

    def purge_expired(self) -> int:
        with self._lock:
            return self._db.execute(
                "DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (time.time(),)
            ).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


# Redis: a hash per job (every field a string; bodies, seeds included, are never decoded by a script), a list of
# queued ids, a sorted set of running ids scored by lease end, and a set of queued ids per owner. Each change of
# state is one Lua script, so replicas sharing the server never both take a job.
_CLAIM = """
local now, worker, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local id = nil
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, 1)
if #stale > 0 then
  id = stale[1]
  if redis.call('HGET', KEYS[4] .. id, 'status') ~= 'running' then redis.call('ZREM', KEYS[2], id); return false end
else
  while true do
    id = redis.call('LPOP', KEYS[1])
    if not id then return false end
    if redis.call('HGET', KEYS[4] .. id, 'status') == 'queued' then break end
  end
  local owner = redis.call('HGET', KEYS[4] .. id, 'owner')
  if owner and owner ~= '' then redis.call('SREM', KEYS[3] .. owner, id) end
end
redis.call('HSET', KEYS[4] .. id, 'status', 'running', 'worker', worker, 'lease_until', tostring(now + lease))
redis.call('HINCRBY', KEYS[4] .. id, 'attempts', 1)
redis.call('ZADD', KEYS[2], now + lease, id)
return id
"""
_ADD = """
local id, owner, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
if owner ~= '' and limit >= 0 and redis.call('SCARD', KEYS[3] .. owner) >= limit then return 0 end
redis.call('HSET', KEYS[4] .. id, unpack(ARGV, 4))
redis.call('RPUSH', KEYS[1], id)
if owner ~= '' then redis.call('SADD', KEYS[3] .. owner, id) end
return 1
"""
_RENEW = """
local status = redis.call('HGET', KEYS[4] .. ARGV[1], 'status')
if not status then return 'lost' end
if status == 'running' then
  if redis.call('HGET', KEYS[4] .. ARGV[1], 'worker') ~= ARGV[2] then return 'lost' end
  redis.call('HSET', KEYS[4] .. ARGV[1], 'lease_until', ARGV[3])
  redis.call('ZADD', KEYS[2], tonumber(ARGV[3]), ARGV[1])
end
return status
"""
_FINISH = """
local key = KEYS[4] .. ARGV[1]
if redis.call('HGET', key, 'status') ~= 'running' or redis.call('HGET', key, 'worker') ~= ARGV[2] then return 0 end
redis.call('HSET', key, 'status', ARGV[3], 'result', ARGV[4], 'error', ARGV[5])
redis.call('PEXPIRE', key, ARGV[6])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
_RELEASE = """
local key = KEYS[4] .. ARGV[1]
if redis.call('HGET', key, 'status') ~= 'running' or redis.call('HGET', key, 'worker') ~= ARGV[2] then return 0 end
redis.call('HSET', key, 'status', 'queued', 'worker', '', 'lease_until', '0')
redis.call('HINCRBY', key, 'attempts', -1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('LPUSH', KEYS[1], ARGV[1])
local owner = redis.call('HGET', key, 'owner')
if owner and owner ~= '' then redis.call('SADD', KEYS[3] .. owner, ARGV[1]) end
return 1
"""
_CANCEL = """
local key = KEYS[4] .. ARGV[1]
local status = redis.call('HGET', key, 'status')
if status ~= 'queued' and status ~= 'running' then return status end
redis.call('HSET', key, 'status', 'cancelled')
redis.call('PEXPIRE', key, ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('LREM', KEYS[1], 0, ARGV[1])
local owner = redis.call('HGET', key, 'owner')
if owner and owner ~= '' then redis.call('SREM', KEYS[3] .. owner, ARGV[1]) end
return 'cancelled'
"""


class RedisJobStore:
    """Jobs in a Redis server that every replica shares; finished jobs expire through Redis's own key TTL."""

    def __init__(self, url: str, *, prefix: str = "softdimo:jobs:"):
        import redis

        self._redis = redis.Redis.from_url(url, decode_responses=True)
        self._keys = [prefix + "queue", prefix + "running", prefix + "owner:", prefix + "job:"]
        self._job_key = prefix + "job:"
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in (
                ("claim", _CLAIM),
                ("add", _ADD),
                ("renew", _RENEW),
                ("finish", _FINISH),
                ("release", _RELEASE),
                ("cancel", _CANCEL),
            )
        }
        self._redis.ping()

    def _run(self, name: str, *args):
        return self._scripts[name](keys=self._keys, args=list(args))

    def add(self, job: JobRecord, *, max_queued_per_owner: int | None) -> bool:
        fields = {
            "id": job.id,
            "endpoint": job.endpoint,
            "body": _dumps(job.body),
            "created": repr(job.created),
            "status": QUEUED,
            "webhook": job.webhook or "",
            "owner": job.owner or "",
            "attempts": "0",
        }
        flat = [part for pair in fields.items() for part in pair]
        limit = -1 if max_queued_per_owner is None else max_queued_per_owner
        return self._run("add", job.id, job.owner or "", limit, *flat) == 1

    def get(self, job_id: str) -> JobRecord | None:
        fields = self._redis.hgetall(self._job_key + job_id)
        if not fields:
            return None
        text = lambda name: fields.get(name) or None  # noqa: E731
        return JobRecord(
            id=fields["id"],
            endpoint=fields["endpoint"],
            body=json.loads(fields["body"]),
            created=float(fields["created"]),
            status=fields["status"],
            webhook=text("webhook"),
            owner=text("owner"),
            progress=_loads(text("progress")),
            result=_loads(text("result")),
            error=_loads(text("error")),
            worker=text("worker"),
            lease_until=float(fields.get("lease_until") or 0),
            attempts=int(fields.get("attempts") or 0),
        )

    def claim(self, *, worker: str, lease_s: float) -> JobRecord | None:
        job_id = self._run("claim", repr(time.time()), worker, repr(lease_s))
        return None if not job_id else self.get(job_id)

    def renew(self, job_id: str, *, worker: str, lease_s: float) -> str:
        return self._run("renew", job_id, worker, repr(time.time() + lease_s))

    def set_progress(self, job_id: str, *, worker: str, progress: dict) -> None:
        # Not a script: a late report on a finished job is harmless, but one on an expired job must not recreate it.
        if self._redis.hget(self._job_key + job_id, "status") == RUNNING:
            self._redis.hset(self._job_key + job_id, "progress", _dumps(progress))

    def finish(
        self, job_id: str, *, worker: str, status: str, result: dict | None, error: dict | None, ttl_s: float
    ) -> bool:
        return (
            self._run("finish", job_id, worker, status, _dumps(result) or "", _dumps(error) or "", int(ttl_s * 1000))
            == 1
        )

    def release(self, job_id: str, *, worker: str) -> None:
        self._run("release", job_id, worker)

    def cancel(self, job_id: str, *, ttl_s: float) -> JobRecord | None:
        if not self._run("cancel", job_id, int(ttl_s * 1000)):
            return None
        return self.get(job_id)

    def count_queued(self, owner: str) -> int:
        return self._redis.scard(self._keys[2] + owner)

    def count_all_queued(self) -> int:
        # The queue list holds exactly the queued ids: a cancel removes its id, a claim pops it.
        return self._redis.llen(self._keys[0])

    def purge_expired(self) -> int:
        return 0  # Redis deletes expired jobs itself

    def close(self) -> None:
        self._redis.close()
