"""Both job stores keep the same promises: arrival order, one claim per job, leases that outlive dead workers,
cancellation, per-owner limits and expiry of finished jobs."""

import time

import pytest
from redis_server import redis_server

from server.job_store import CANCELLED, QUEUED, RUNNING, SUCCEEDED, JobRecord, RedisJobStore, SQLiteJobStore


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        yield store
        store.close()
        return
    with redis_server(tmp_path) as url:
        store = RedisJobStore(url)
        yield store
        store.close()


def job(job_id: str, owner: str | None = None, seed: int = 2**63 - 1) -> JobRecord:
    return JobRecord(
        id=job_id, endpoint="refine", body={"prompt": "a red circle", "seed": seed}, created=time.time(), owner=owner
    )


def test_jobs_are_claimed_once_each_in_arrival_order_with_their_body_intact(store):
    for name in ("a", "b", "c"):
        assert store.add(job(name), max_queued_per_owner=None)
    claimed = [store.claim(worker="w1", lease_s=30) for _ in range(3)]
    assert [j.id for j in claimed] == ["a", "b", "c"] and store.claim(worker="w2", lease_s=30) is None
    assert claimed[0].body["seed"] == 2**63 - 1  # seeds up to 2^63 survive, so a rerun draws the same images
    assert {j.status for j in claimed} == {RUNNING} and claimed[0].attempts == 1


def test_a_dead_workers_job_is_claimed_again_after_its_lease_and_the_dead_worker_cannot_finish_it(store):
    store.add(job("a"), max_queued_per_owner=None)
    assert store.claim(worker="dead", lease_s=0.3).id == "a"
    assert store.claim(worker="alive", lease_s=30) is None  # the lease still holds
    time.sleep(0.4)
    again = store.claim(worker="alive", lease_s=30)
    assert again.id == "a" and again.attempts == 2 and again.worker == "alive"
    assert store.renew("a", worker="dead", lease_s=30) == "lost"
    assert not store.finish("a", worker="dead", status=SUCCEEDED, result={"x": 1}, error=None, ttl_s=60)
    assert store.finish("a", worker="alive", status=SUCCEEDED, result={"x": 2}, error=None, ttl_s=60)
    assert store.get("a").result == {"x": 2} and store.get("a").status == SUCCEEDED


def test_renewing_keeps_a_lease_and_release_puts_the_job_back_first(store):
    store.add(job("a"), max_queued_per_owner=None)
    store.add(job("b"), max_queued_per_owner=None)
    assert store.claim(worker="w", lease_s=0.3).id == "a"
    time.sleep(0.2)
    assert store.renew("a", worker="w", lease_s=30) == RUNNING
    time.sleep(0.2)
    assert store.claim(worker="other", lease_s=30).id == "b"  # not "a": its lease was renewed
    store.release("a", worker="w")
    assert store.get("a").status == QUEUED
    again = store.claim(worker="other", lease_s=30)
    assert again.id == "a" and again.attempts == 1  # a job handed back by a drain has not used up an attempt


def test_cancelled_jobs_are_never_claimed_and_a_running_one_hears_it(store):
    store.add(job("a"), max_queued_per_owner=None)
    store.add(job("b"), max_queued_per_owner=None)
    assert store.cancel("a", ttl_s=60).status == CANCELLED
    assert store.claim(worker="w", lease_s=30).id == "b"
    assert store.cancel("b", ttl_s=60).status == CANCELLED
    assert store.renew("b", worker="w", lease_s=30) == CANCELLED
    assert not store.finish("b", worker="w", status=SUCCEEDED, result={}, error=None, ttl_s=60)
    assert store.cancel("nope", ttl_s=60) is None and store.get("nope") is None


def test_an_owner_may_hold_only_so_many_queued_jobs(store):
    assert store.add(job("a", owner="k"), max_queued_per_owner=2) and store.add(
        job("b", owner="k"), max_queued_per_owner=2
    )
    assert not store.add(job("c", owner="k"), max_queued_per_owner=2) and store.get("c") is None
    assert store.add(job("d", owner="other"), max_queued_per_owner=2)
    assert store.count_queued("k") == 2
    store.claim(worker="w", lease_s=30)  # "a" runs: no longer queued
    assert store.count_queued("k") == 1 and store.add(job("c", owner="k"), max_queued_per_owner=2)


def test_the_queued_count_covers_every_owner_and_only_jobs_waiting_to_be_claimed(store):
    assert store.count_all_queued() == 0
    for name, owner in (("a", "k"), ("b", None), ("c", "other"), ("d", None)):
        store.add(job(name, owner=owner), max_queued_per_owner=None)
    assert store.count_all_queued() == 4
    store.claim(worker="w", lease_s=30)  # "a" runs
    store.cancel("c", ttl_s=60)
    assert store.count_all_queued() == 2
    store.release("a", worker="w")  # a drain hands "a" back: waiting again
    assert store.count_all_queued() == 3
    for _ in range(3):
        store.claim(worker="w", lease_s=30)
    assert store.count_all_queued() == 0


def test_finished_jobs_expire(store):
    store.add(job("a"), max_queued_per_owner=None)
    store.claim(worker="w", lease_s=30)
    store.finish("a", worker="w", status=SUCCEEDED, result={"x": 1}, error=None, ttl_s=0.3)
    assert store.get("a").result == {"x": 1}
    time.sleep(0.5)
    store.purge_expired()
    assert store.get("a") is None


def test_sqlite_jobs_survive_reopening_the_file(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    store.add(job("a"), max_queued_per_owner=None)
    store.close()
    reopened = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    assert reopened.claim(worker="w", lease_s=30).id == "a"
    assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()
