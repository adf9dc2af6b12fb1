"""Tests of the dynamic batcher with a fake model that doubles numbers and records what it saw."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import pytest

from server.batcher import (
    BatchFailed,
    Batcher,
    DeadlineExceeded,
    Draining,
    NullObserver,
    QueueFull,
)


@dataclass(frozen=True)
class Req:
    value: int
    n: int = 1
    key: Hashable = None


@dataclass
class FakeModel:
    """Doubles each request's value; `on_call(call_index)` runs first and may sleep, block or raise."""

    on_call: Callable[[int], None] | None = None
    short_by_one_on: set[int] = field(default_factory=set)
    batches: list[list[int]] = field(default_factory=list)
    started_at: list[float] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)
    max_concurrent: int = 0
    _concurrent: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, items: list[Req]) -> list[int]:
        with self._lock:
            call = len(self.batches)
            self.batches.append([item.value for item in items])
            self.started_at.append(time.monotonic())
            self.threads.add(threading.current_thread().name)
            self._concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self._concurrent)
        try:
            if self.on_call is not None:
                self.on_call(call)
            outputs = [item.value * 2 for item in items]
            return outputs[:-1] if call in self.short_by_one_on else outputs
        finally:
            with self._lock:
                self._concurrent -= 1


@dataclass
class RecordingObserver(NullObserver):
    depths: list[int] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    executed: list[tuple[int, int, float]] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)

    def queue_depth(self, images: int) -> None:
        self.depths.append(images)

    def queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def batch_executed(self, images: int, requests: int, seconds: float) -> None:
        self.executed.append((images, requests, seconds))

    def rejected(self, reason: str) -> None:
        self.rejections.append(reason)


def make_batcher(model: FakeModel, **options) -> Batcher[Req, int]:
    settings = dict(
        max_batch_size=4, max_wait_s=0.05, max_queue=16, size_of=lambda req: req.n, key_of=lambda req: req.key
    )
    settings.update(options)
    return Batcher(model, **settings)


def wait_for_gate(gate: threading.Event, calls: set[int]) -> Callable[[int], None]:
    """An on_call that holds the given calls until the gate opens (bounded, so a failing test cannot hang)."""

    def on_call(call: int) -> None:
        if call in calls:
            gate.wait(2.0)

    return on_call


def run(main: Callable[[], Awaitable[None]]) -> None:
    """asyncio.run with a time limit, so a request the batcher never answers fails the test instead of hanging it."""
    asyncio.run(asyncio.wait_for(main(), 3.0))


async def until(condition: Callable[[], bool], timeout_s: float = 1.0) -> None:
    stop_at = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < stop_at, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_concurrent_submits_fill_batches_to_max_size_without_waiting():
    model = FakeModel()

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=4, max_wait_s=5.0)
        await batcher.start()
        started = time.monotonic()
        results = await asyncio.gather(*(batcher.submit(Req(i)) for i in range(8)))
        elapsed = time.monotonic() - started
        await batcher.stop()
        assert results == [0, 2, 4, 6, 8, 10, 12, 14]
        assert elapsed < 1.0  # full batches must not sit out the 5 s max wait

    run(main)
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_batch_waits_max_wait_counted_from_its_first_item_while_company_keeps_coming():
    model = FakeModel()

    async def main() -> None:
        batcher = make_batcher(model, max_wait_s=0.2)
        await batcher.start()
        queued_first = time.monotonic()
        first = asyncio.create_task(batcher.submit(Req(1)))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit(Req(2)))  # a gap well inside the wait: more may come
        assert await first == 2 and await second == 4
        await batcher.stop()
        # One batch, started ~0.2 s after the first item (not 0.25 s, 0.2 s after the second).
        assert 0.2 <= model.started_at[0] - queued_first < 0.3

    run(main)
    assert model.batches == [[1, 2]]


def test_sparse_arrivals_run_at_once_instead_of_waiting_for_company():
    model = FakeModel()

    async def main() -> None:
        batcher = make_batcher(model, max_wait_s=0.1)
        await batcher.start()
        assert await batcher.submit(Req(1)) == 2  # no arrivals seen yet: waits out max_wait
        await asyncio.sleep(0.2)
        queued = time.monotonic()
        assert await batcher.submit(Req(2)) == 4  # arrivals ~0.3 s apart: nobody is due within 0.1 s
        assert model.started_at[1] - queued < 0.05
        await batcher.stop()

    run(main)
    assert model.batches == [[1], [2]]


def test_a_batcher_told_not_to_skip_waits_gathers_a_burst_after_a_quiet_spell():
    model = FakeModel()

    async def main() -> None:
        batcher = make_batcher(model, max_wait_s=0.1, skip_wait_when_sparse=False)
        await batcher.start()
        assert await batcher.submit(Req(1)) == 2
        await asyncio.sleep(0.2)  # a quiet spell: arrivals look sparse
        first = asyncio.ensure_future(batcher.submit(Req(2)))
        await asyncio.sleep(0.03)
        assert await asyncio.gather(first, batcher.submit(Req(3))) == [4, 6]
        await batcher.stop()

    run(main)
    assert model.batches == [[1], [2, 3]]


def test_zero_max_wait_runs_immediately():
    model = FakeModel()

    async def main() -> None:
        batcher = make_batcher(model, max_wait_s=0.0)
        await batcher.start()
        queued = time.monotonic()
        assert await batcher.submit(Req(3)) == 6
        assert model.started_at[0] - queued < 0.05
        await batcher.stop()

    run(main)
    assert model.batches == [[3]]


def test_batches_are_composed_by_image_counts_in_arrival_order():
    model = FakeModel()
    sizes = [2, 1, 3, 2, 1]

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=4, max_wait_s=0.05)
        await batcher.start()
        with pytest.raises(ValueError, match="1 to 4 images"):
            await batcher.submit(Req(99, n=5))
        results = await asyncio.gather(*(batcher.submit(Req(i, n=n)) for i, n in enumerate(sizes)))
        await batcher.stop()
        assert results == [0, 2, 4, 6, 8]

    run(main)
    # 2+1 then 3 would not fit, 3 then 2 would not fit, 2+1 last; item 99 never reached the model.
    assert model.batches == [[0, 1], [2], [3, 4]]


def test_batches_hold_one_key_and_the_oldest_item_goes_first():
    model = FakeModel()
    keys = ["a", "b", "a", "a", "a"]

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=2, max_wait_s=0.05)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(Req(i, key=k)) for i, k in enumerate(keys)))
        await batcher.stop()
        assert results == [0, 2, 4, 6, 8]

    run(main)
    # Item 1 (key b) is older than items 3 and 4, so it runs before them even in a batch of one.
    assert model.batches == [[0, 2], [1], [3, 4]]


def test_overflow_raises_queue_full_and_accepted_items_still_complete():
    gate = threading.Event()
    model = FakeModel(on_call=wait_for_gate(gate, {0}))
    observer = RecordingObserver()

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=2, max_queue=4, max_wait_s=0.0, observer=observer)
        await batcher.start()
        running = [asyncio.create_task(batcher.submit(Req(i))) for i in range(2)]
        await until(lambda: len(model.batches) == 1)
        queued = [asyncio.create_task(batcher.submit(Req(i, n=2))) for i in range(2, 4)]
        await until(lambda: batcher.queued_images == 4)
        with pytest.raises(QueueFull) as rejected:
            await batcher.submit(Req(4))
        # No batch has finished yet, so there is no duration to go by: the 1 s floor.
        assert rejected.value.retry_after_s == 1.0
        gate.set()
        assert await asyncio.gather(*running, *queued) == [0, 2, 4, 6]
        await batcher.stop()

    run(main)
    assert model.batches == [[0, 1], [2], [3]]
    assert observer.rejections == ["queue_full"]


def test_queued_cost_is_bounded_apart_from_images_and_freed_as_work_leaves_the_queue():
    gate = threading.Event()
    model = FakeModel(on_call=wait_for_gate(gate, {0}))
    observer = RecordingObserver()

    async def main() -> None:
        # Cost is the request's value here: plenty of image room (16), but only 10 units of cost.
        batcher = make_batcher(
            model,
            max_batch_size=1,
            max_queue=16,
            max_wait_s=0.0,
            cost_of=lambda req: req.value,
            max_queue_cost=10,
            observer=observer,
        )
        await batcher.start()
        with pytest.raises(ValueError, match="at most max_queue_cost = 10"):
            await batcher.submit(Req(11))  # could never be queued: an error, not a retry-later
        running = asyncio.create_task(batcher.submit(Req(9)))  # runs at once: the running batch is not queued cost
        await until(lambda: len(model.batches) == 1)
        queued = [asyncio.create_task(batcher.submit(Req(v))) for v in (6, 4)]
        await until(lambda: batcher.queued_cost == 10)
        with pytest.raises(QueueFull) as rejected:
            await batcher.submit(Req(1))
        assert rejected.value.limit == "max_queue_cost" and rejected.value.value == 10
        assert batcher.queued_images == 2 and rejected.value.retry_after_s >= 1.0
        queued[1].cancel()  # a client that leaves gives its cost back
        await until(lambda: batcher.queued_cost == 6)
        late = asyncio.create_task(batcher.submit(Req(3)))
        await until(lambda: batcher.queued_cost == 9)
        gate.set()
        assert await asyncio.gather(running, queued[0], late) == [18, 12, 6]
        assert batcher.queued_cost == 0
        await batcher.stop()

    run(main)
    assert model.batches == [[9], [6], [3]]
    assert observer.rejections == ["queue_full", "disconnected"]


def test_image_limit_names_itself_in_queue_full():
    gate = threading.Event()
    model = FakeModel(on_call=wait_for_gate(gate, {0}))

    async def main() -> None:
        batcher = make_batcher(
            model, max_batch_size=1, max_queue=1, max_wait_s=0.0, cost_of=lambda req: 1, max_queue_cost=100
        )
        await batcher.start()
        running = asyncio.create_task(batcher.submit(Req(0)))
        await until(lambda: len(model.batches) == 1)
        queued = asyncio.create_task(batcher.submit(Req(1)))
        await until(lambda: batcher.queued_images == 1)
        with pytest.raises(QueueFull) as rejected:
            await batcher.submit(Req(2))
        assert rejected.value.limit == "max_queue" and rejected.value.value == 1
        gate.set()
        assert await asyncio.gather(running, queued) == [0, 2]
        await batcher.stop()

    run(main)


def test_retry_after_grows_with_batch_duration_and_queue_length():
    gate = threading.Event()

    def on_call(call: int) -> None:
        if call == 0:
            time.sleep(0.5)
        elif call == 1:
            gate.wait(2.0)

    model = FakeModel(on_call=on_call)

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=1, max_queue=2, max_wait_s=0.0)
        await batcher.start()
        assert await batcher.submit(Req(0)) == 0  # one 0.5 s batch sets the average
        running = asyncio.create_task(batcher.submit(Req(1)))
        await until(lambda: len(model.batches) == 2)
        queued = [asyncio.create_task(batcher.submit(Req(i))) for i in (2, 3)]
        await until(lambda: batcher.queued_images == 2)
        with pytest.raises(QueueFull) as rejected:
            await batcher.submit(Req(4))
        gate.set()
        assert await asyncio.gather(running, *queued) == [2, 4, 6]
        await batcher.stop()
        # Two queued batches plus the running one, at ~0.5 s each.
        assert 1.5 <= rejected.value.retry_after_s < 1.8

    run(main)


def test_deadline_while_queued_fails_at_the_deadline_and_never_runs():
    gate = threading.Event()
    model = FakeModel(on_call=wait_for_gate(gate, {0}))
    observer = RecordingObserver()

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=1, max_wait_s=0.0, observer=observer)
        await batcher.start()
        running = asyncio.create_task(batcher.submit(Req(0)))
        await until(lambda: len(model.batches) == 1)
        submitted = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(Req(1), deadline=submitted + 0.1)
        assert 0.1 <= time.monotonic() - submitted < 0.25
        assert batcher.queued_images == 0
        gate.set()
        assert await running == 0
        assert await batcher.submit(Req(2)) == 4
        await batcher.stop()

    run(main)
    assert model.batches == [[0], [2]]
    assert observer.rejections == ["deadline"]


def test_item_expired_when_its_batch_forms_is_never_run():
    model = FakeModel()

    async def main() -> None:
        batcher = make_batcher(model, max_wait_s=0.0)
        await batcher.start()
        late = asyncio.create_task(batcher.submit(Req(1), deadline=time.monotonic() + 0.02))
        await asyncio.sleep(0)  # queued, and the loop has been woken
        time.sleep(0.05)  # block the event loop past the deadline before the loop gets to run
        with pytest.raises(DeadlineExceeded):
            await late
        assert await batcher.submit(Req(2)) == 4
        await batcher.stop()

    run(main)
    assert model.batches == [[2]]


def test_deadline_while_running_fails_at_the_deadline_and_the_loop_survives():
    model = FakeModel(on_call=lambda call: time.sleep(0.3) if call == 0 else None)

    async def main() -> None:
        batcher = make_batcher(model, max_wait_s=0.0)
        await batcher.start()
        submitted = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(Req(1), deadline=submitted + 0.1)
        assert 0.1 <= time.monotonic() - submitted < 0.25
        assert await batcher.submit(Req(2)) == 4  # the late result of batch 1 did not break the loop
        await batcher.stop()

    run(main)
    assert model.batches == [[1], [2]]


def test_cancelled_request_is_dropped_before_running_and_the_loop_survives():
    gate = threading.Event()
    model = FakeModel(on_call=wait_for_gate(gate, {0}))
    observer = RecordingObserver()

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=1, max_wait_s=0.0, observer=observer)
        await batcher.start()
        running = asyncio.create_task(batcher.submit(Req(0)))
        await until(lambda: len(model.batches) == 1)
        abandoned = asyncio.create_task(batcher.submit(Req(1)))
        await until(lambda: batcher.queued_images == 1)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        assert batcher.queued_images == 0
        gate.set()
        assert await running == 0
        assert await batcher.submit(Req(2)) == 4
        assert batcher.running
        await batcher.stop()

    run(main)
    assert model.batches == [[0], [2]]
    assert observer.rejections == ["disconnected"]


def test_a_failing_batch_fails_only_its_own_requests():
    def on_call(call: int) -> None:
        if call == 0:
            raise RuntimeError("CUDA out of memory")

    model = FakeModel(on_call=on_call)

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=2, max_wait_s=0.05)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(Req(i)) for i in range(4)), return_exceptions=True)
        await batcher.stop()
        first, second = results[:2]
        for failure in (first, second):
            assert isinstance(failure, BatchFailed)
            assert "batch of 2 requests" in str(failure) and "failed" in str(failure)
            assert "RuntimeError: CUDA out of memory" in str(failure)
            assert isinstance(failure.__cause__, RuntimeError)
        assert first is not second
        assert results[2:] == [4, 6]

    run(main)
    assert model.batches == [[0, 1], [2, 3]]


def test_output_count_mismatch_fails_the_batch():
    model = FakeModel(short_by_one_on={0})

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=2, max_wait_s=0.05)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(Req(i)) for i in range(4)), return_exceptions=True)
        await batcher.stop()
        for failure in results[:2]:
            assert isinstance(failure, BatchFailed)
            assert "returned 1 outputs for 2 inputs" in str(failure)
        assert results[2:] == [4, 6]

    run(main)
    assert model.batches == [[0, 1], [2, 3]]


def test_event_loop_stays_responsive_and_batches_run_one_at_a_time_off_the_loop():
    model = FakeModel(on_call=lambda call: time.sleep(0.1))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=1, max_wait_s=0.0)
        await batcher.start()
        ticking = asyncio.create_task(ticker())
        assert await asyncio.gather(*(batcher.submit(Req(i)) for i in range(3))) == [0, 2, 4]
        ticking.cancel()
        await batcher.stop()

    run(main)
    assert ticks >= 15  # ~30 in 0.3 s of model work; a blocked loop would manage ~0
    assert model.max_concurrent == 1
    assert model.threads != {threading.main_thread().name}
    assert len(model.threads) == 1
    assert model.batches == [[0], [1], [2]]


def test_stop_with_drain_finishes_queued_work_then_refuses_new_work():
    model = FakeModel()
    observer = RecordingObserver()

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=4, max_wait_s=5.0, observer=observer)
        await batcher.start()
        queued = [asyncio.create_task(batcher.submit(Req(i))) for i in range(3)]
        await until(lambda: batcher.queued_images == 3)
        started = time.monotonic()
        await batcher.stop(drain=True)
        assert time.monotonic() - started < 1.0  # drained at once, not after the 5 s max wait
        assert [task.result() for task in queued] == [0, 2, 4]
        assert not batcher.running
        with pytest.raises(Draining):
            await batcher.submit(Req(3))
        await batcher.stop()  # idempotent

    run(main)
    assert model.batches == [[0, 1, 2]]
    assert observer.rejections == ["draining"]


def test_stop_without_drain_fails_queued_work_but_finishes_the_running_batch():
    gate = threading.Event()
    model = FakeModel(on_call=wait_for_gate(gate, {0}))

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=1, max_wait_s=0.0)
        await batcher.start()
        running = asyncio.create_task(batcher.submit(Req(0)))
        await until(lambda: len(model.batches) == 1)
        queued = [asyncio.create_task(batcher.submit(Req(i))) for i in (1, 2)]
        await until(lambda: batcher.queued_images == 2)
        stopping = asyncio.create_task(batcher.stop(drain=False))
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert [type(result) for result in results] == [Draining, Draining]
        gate.set()
        await stopping
        assert await running == 0
        assert not batcher.running

    run(main)
    assert model.batches == [[0]]


def test_stop_timeout_fails_work_that_does_not_finish():
    gate = threading.Event()
    model = FakeModel(on_call=lambda call: gate.wait(0.5))

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=1, max_wait_s=0.0)
        await batcher.start()
        running = asyncio.create_task(batcher.submit(Req(0)))
        await until(lambda: len(model.batches) == 1)
        queued = asyncio.create_task(batcher.submit(Req(1)))
        await until(lambda: batcher.queued_images == 1)
        started = time.monotonic()
        await batcher.stop(timeout_s=0.1)
        assert 0.1 <= time.monotonic() - started < 0.3
        results = await asyncio.gather(running, queued, return_exceptions=True)
        assert [type(result) for result in results] == [Draining, Draining]
        assert not batcher.running
        gate.set()

    run(main)
    assert model.batches == [[0]]


def test_submit_before_start_is_an_error():
    async def main() -> None:
        batcher = make_batcher(FakeModel())
        with pytest.raises(RuntimeError, match="not been started"):
            await batcher.submit(Req(0))

    run(main)


def test_observer_sees_queue_depth_waits_and_batches():
    model = FakeModel(on_call=lambda call: time.sleep(0.05))
    observer = RecordingObserver()

    async def main() -> None:
        batcher = make_batcher(model, max_batch_size=4, max_wait_s=0.15, observer=observer)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(Req(0, n=1)))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit(Req(1, n=2)))
        assert await first == 0 and await second == 2
        await batcher.stop()

    run(main)
    assert model.batches == [[0, 1]]
    assert observer.depths == [1, 3, 0]
    first_wait, second_wait = observer.waits
    assert 0.15 <= first_wait < 0.25
    assert 0.05 <= second_wait < first_wait - 0.03
    [(images, requests, seconds)] = observer.executed
    assert (images, requests) == (3, 2)
    assert 0.05 <= seconds < 0.15
    assert observer.rejections == []
