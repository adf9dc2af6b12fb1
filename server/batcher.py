"""Dynamic batching: one queue of requests, grouped into batches for a synchronous model call run off the event loop."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

# Weight of the newest batch in the moving average of batch durations: high enough to follow a model
# that got slower (e.g. larger images), low enough that one odd batch does not swing Retry-After.
_DURATION_SMOOTHING = 0.3
# Weight of the newest gap in the moving average of the time between arrivals.
_ARRIVAL_SMOOTHING = 0.3
_MIN_RETRY_AFTER_S = 1.0


class QueueFull(Exception):
    """The queue holds too many images (or too much cost) to accept this request; retry after `retry_after_s`.

    `limit` names the bound that was hit: "max_queue" (images) or "max_queue_cost"; `value` is its value."""

    def __init__(self, message: str, *, retry_after_s: float, limit: str = "max_queue", value: int = 0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit
        self.value = value


class DeadlineExceeded(Exception):
    """The request's deadline passed before its result was ready."""


class BatchFailed(Exception):
    """The batch this request was part of failed; `__cause__` is the original error, if there was one."""


class Draining(Exception):
    """The batcher is stopping and takes no more work."""


class BatchObserver(Protocol):
    """Hooks for metrics; subclass NullObserver to implement only some of them."""

    def queue_depth(self, images: int) -> None: ...

    def queue_wait(self, seconds: float) -> None: ...

    def batch_executed(self, images: int, requests: int, seconds: float) -> None: ...

    def rejected(self, reason: str) -> None: ...


class NullObserver:
    """A BatchObserver that ignores everything."""

    def queue_depth(self, images: int) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def batch_executed(self, images: int, requests: int, seconds: float) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


def _one_image(item: Any) -> int:
    return 1


def _same_key(item: Any) -> Hashable:
    return None


def _no_cost(item: Any) -> int:
    return 0


class _State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DROPPED = "dropped"


@dataclass(eq=False)  # identity equality: deque.remove and sets must find this very request
class _Pending(Generic[In, Out]):
    item: In
    size: int
    cost: int
    key: Hashable
    future: asyncio.Future[Out]
    queued_at: float
    deadline: float | None
    state: _State = _State.QUEUED


class Batcher(Generic[In, Out]):
    """Collects submitted items into batches for `run_batch` and hands each caller its own output.

    A batch holds items with the key of the oldest queued item, in arrival order, up to `max_batch_size`
    images; it starts when it cannot grow any more or `max_wait_s` after its oldest item was queued, and
    at once when arrivals are sparse: a batch waits only while the mean gap between recent arrivals says
    another item should come before its wait ends, so a lone request at low load never sits out the wait.

    The queue admits up to `max_queue` images and, when `max_queue_cost` is given, up to that much total
    `cost_of` (work that images alone do not show, such as sampling steps); beyond either, QueueFull."""

    def __init__(
        self,
        run_batch: Callable[[list[In]], list[Out]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        size_of: Callable[[In], int] = _one_image,
        key_of: Callable[[In], Hashable] = _same_key,
        cost_of: Callable[[In], int] = _no_cost,
        max_queue_cost: int | None = None,
        executor: concurrent.futures.Executor | None = None,
        observer: BatchObserver | None = None,
        name: str = "batcher",
        skip_wait_when_sparse: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        if max_queue < max_batch_size:
            # Otherwise a request of max_batch_size images could never be queued and would get
            # QueueFull forever, which tells the client to retry something that cannot succeed.
            raise ValueError(f"max_queue ({max_queue}) must be at least max_batch_size ({max_batch_size})")
        self.name = name
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        # Cheap batches skip the wait when recent arrivals say no company is due; a batch that computes for
        # seconds waits its whole max wait, since a burst's first request looks just like a lone one.
        self._skip_wait_when_sparse = skip_wait_when_sparse
        self._max_queue = max_queue
        self._size_of = size_of
        self._key_of = key_of
        self._cost_of = cost_of
        self._max_queue_cost = max_queue_cost
        self._given_executor = executor
        self._owned_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._observer: BatchObserver = observer if observer is not None else NullObserver()

        self._queue: collections.deque[_Pending[In, Out]] = collections.deque()
        self._queued_images = 0
        self._queued_cost = 0
        self._running_batch: list[_Pending[In, Out]] = []
        self._mean_batch_s: float | None = None
        self._last_arrival: float | None = None
        self._mean_gap_s: float | None = None  # None until two items have arrived: then wait, as if company were due
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def queued_images(self) -> int:
        """Images waiting for a batch (not counting the batch now running)."""
        return self._queued_images

    @property
    def queued_cost(self) -> int:
        """Total `cost_of` of the items waiting for a batch."""
        return self._queued_cost

    @property
    def running(self) -> bool:
        """Whether the batch loop is alive (False before start, after stop, or if it crashed)."""
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        if self._stopping:
            raise RuntimeError(f"{self.name} was stopped; make a new Batcher")
        if self._loop_task is not None:
            return
        if self._given_executor is None:
            # One thread: the model runs one batch at a time, and a dedicated thread keeps other
            # blocking work on the loop's default executor from queueing behind a long batch.
            self._owned_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._loop_task = asyncio.create_task(self._serve_until_stopped(), name=f"{self.name}-loop")

    async def stop(self, *, drain: bool = True, timeout_s: float | None = None) -> None:
        """Refuse new work; finish (drain=True) or fail (drain=False) the queued work; end the loop.

        A batch already running is allowed to finish either way, since its model work is already spent.
        Whatever is left when `timeout_s` runs out fails with Draining."""
        self._stopping = True
        if not drain:
            self._fail_queued("stopped without draining")
        self._wakeup.set()
        task = self._loop_task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                log.warning("%s: work left after %.1f s of draining; failing it", self.name, timeout_s)
                self._fail_queued("did not finish before the drain timeout")
                task.cancel()
                await asyncio.wait({task})
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # already logged by the loop; retrieving it silences asyncio's warning
        if self._owned_executor is not None:
            # wait=False: after a drain timeout the thread may still be inside run_batch, and joining
            # it here would block the event loop; its late result goes nowhere.
            self._owned_executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: In, *, deadline: float | None = None) -> Out:
        """Queue `item` and return its output; `deadline` is an absolute time.monotonic() value."""
        if self._stopping:
            self._observer_call(self._observer.rejected, "draining")
            raise Draining(f"{self.name} is shutting down")
        if self._loop_task is None:
            raise RuntimeError(f"{self.name} has not been started")
        size = self._size_of(item)
        if not 1 <= size <= self._max_batch_size:
            raise ValueError(f"an item must cost 1 to {self._max_batch_size} images, this one costs {size}")
        cost = self._cost_of(item)
        if self._max_queue_cost is not None and cost > self._max_queue_cost:
            raise ValueError(
                f"an item must cost at most max_queue_cost = {self._max_queue_cost}, this one costs {cost}"
            )
        key = self._key_of(item)
        if deadline is not None and deadline <= time.monotonic():
            self._observer_call(self._observer.rejected, "deadline")
            raise DeadlineExceeded(f"{self.name}: the deadline had passed before the request was queued")
        if self._queued_images + size > self._max_queue:
            self._refuse_full(
                f"{self._queued_images} of {self._max_queue} images queued, no room for {size} more",
                limit="max_queue",
                value=self._max_queue,
            )
        if self._max_queue_cost is not None and self._queued_cost + cost > self._max_queue_cost:
            self._refuse_full(
                f"a cost of {self._queued_cost} of {self._max_queue_cost} queued, no room for {cost} more",
                limit="max_queue_cost",
                value=self._max_queue_cost,
            )

        queued_at = time.monotonic()
        self._note_arrival(queued_at)
        pending: _Pending[In, Out] = _Pending(
            item=item,
            size=size,
            cost=cost,
            key=key,
            future=asyncio.get_running_loop().create_future(),
            queued_at=queued_at,
            deadline=deadline,
        )
        self._queue.append(pending)
        self._queued_cost += cost
        self._set_queued_images(self._queued_images + size)
        self._wakeup.set()
        try:
            if deadline is None:
                return await pending.future
            # An independent timer, so the caller hears at its deadline even if the batch loop is
            # busy with a long batch; the timeout cancels the future, which the loop then skips.
            async with asyncio.timeout(deadline - time.monotonic()):
                return await pending.future
        except (TimeoutError, DeadlineExceeded):
            self._unqueue(pending)
            self._observer_call(self._observer.rejected, "deadline")
            raise DeadlineExceeded(f"{self.name}: the deadline passed before the result was ready") from None
        except asyncio.CancelledError:
            self._unqueue(pending)
            self._observer_call(self._observer.rejected, "disconnected")
            raise
        except Draining:
            self._observer_call(self._observer.rejected, "draining")
            raise

    def _note_arrival(self, now: float) -> None:
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._mean_gap_s = (
                gap
                if self._mean_gap_s is None
                else _ARRIVAL_SMOOTHING * gap + (1 - _ARRIVAL_SMOOTHING) * self._mean_gap_s
            )
        self._last_arrival = now

    def _company_expected_within(self, seconds: float) -> bool:
        """Whether, at the recent arrival rate, another item should arrive in the next `seconds`."""
        return self._mean_gap_s is None or self._mean_gap_s <= seconds

    def _refuse_full(self, message: str, *, limit: str, value: int) -> None:
        retry_after_s = self._retry_after_s()
        self._observer_call(self._observer.rejected, "queue_full")
        raise QueueFull(f"{self.name}: {message}", retry_after_s=retry_after_s, limit=limit, value=value)

    def _unqueue(self, pending: _Pending[In, Out]) -> None:
        if pending.state is not _State.QUEUED:
            return  # already running: its result is dropped when it arrives, as its future is done
        self._queue.remove(pending)
        pending.state = _State.DROPPED
        self._queued_cost -= pending.cost
        self._set_queued_images(self._queued_images - pending.size)
        self._wakeup.set()  # the oldest item may have changed, and with it the batch timer

    def _retry_after_s(self) -> float:
        # Rule: the time to work off everything queued now plus the batch now running, i.e. that many
        # batches times the moving average of batch durations, and never less than 1 s (also the answer
        # before any batch has run). Working off the whole queue rather than just enough of it to make
        # room spreads the retries of many rejected clients instead of having them all collide again.
        batches_ahead = math.ceil(self._queued_images / self._max_batch_size) + (1 if self._running_batch else 0)
        return max(_MIN_RETRY_AFTER_S, batches_ahead * (self._mean_batch_s or 0.0))

    def _set_queued_images(self, images: int) -> None:
        if images != self._queued_images:
            self._queued_images = images
            self._observer_call(self._observer.queue_depth, images)

    def _observer_call(self, hook: Callable[..., None], *args: Any) -> None:
        # Metrics must never take the service down: a failing hook inside the batch loop would kill it.
        try:
            hook(*args)
        except Exception:
            log.exception("%s: observer hook %s failed", self.name, getattr(hook, "__name__", hook))

    @staticmethod
    def _settle(pending: _Pending[In, Out], *, result: Any = None, error: BaseException | None = None) -> None:
        # A done future here was cancelled by its caller (disconnect or deadline); setting it would
        # raise InvalidStateError inside the loop, which is how Ray's batch loop died.
        if pending.future.done():
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)

    def _fail_queued(self, reason: str) -> None:
        failed, self._queue = self._queue, collections.deque()
        for pending in failed:
            pending.state = _State.DROPPED
            self._settle(pending, error=Draining(f"{self.name} is shutting down: {reason}"))
        self._queued_cost = 0
        self._set_queued_images(0)

    async def _serve_until_stopped(self) -> None:
        try:
            await self._serve()
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("%s: batch loop crashed", self.name)
            raise
        finally:
            # Nothing will serve this queue any more: refuse new work and release whoever waits.
            self._stopping = True
            self._fail_queued("the batch loop ended")

    async def _serve(self) -> None:
        while True:
            # Cleared before looking at the queue, so a change made while we wait sets it again.
            self._wakeup.clear()
            self._drop_abandoned()
            if not self._queue:
                if self._stopping:
                    return
                await self._wakeup.wait()
                continue
            batch, can_grow = self._next_batch()
            wait_s = self._queue[0].queued_at + self._max_wait_s - time.monotonic()
            expect_company = not self._skip_wait_when_sparse or self._company_expected_within(wait_s)
            if can_grow and wait_s > 0 and not self._stopping and expect_company:
                try:
                    async with asyncio.timeout(wait_s):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
                continue
            await self._execute(batch)

    def _drop_abandoned(self) -> None:
        """Remove items whose caller went away or whose deadline has passed, so they never run."""
        now = time.monotonic()
        kept: collections.deque[_Pending[In, Out]] = collections.deque()
        for pending in self._queue:
            expired = pending.deadline is not None and pending.deadline <= now
            if pending.future.done() or expired:
                pending.state = _State.DROPPED
                # The caller's own handler reports the rejection, so it is counted once.
                self._settle(pending, error=DeadlineExceeded(f"{self.name}: the deadline passed in the queue"))
            else:
                kept.append(pending)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._queued_cost = sum(pending.cost for pending in kept)
            self._set_queued_images(sum(pending.size for pending in kept))

    def _next_batch(self) -> tuple[list[_Pending[In, Out]], bool]:
        """The batch the oldest item would run in now, and whether more arrivals could still join it."""
        key = self._queue[0].key
        batch: list[_Pending[In, Out]] = []
        images = 0
        for pending in self._queue:
            if pending.key != key:
                continue
            if images + pending.size > self._max_batch_size:
                # Strict arrival order within a key: a later, smaller item does not jump this one.
                return batch, False
            batch.append(pending)
            images += pending.size
            if images == self._max_batch_size:
                return batch, False
        return batch, True

    async def _execute(self, batch: list[_Pending[In, Out]]) -> None:
        taken = set(batch)
        self._queue = collections.deque(pending for pending in self._queue if pending not in taken)
        for pending in batch:
            pending.state = _State.RUNNING
        images = sum(pending.size for pending in batch)
        self._queued_cost -= sum(pending.cost for pending in batch)
        self._set_queued_images(self._queued_images - images)
        started = time.monotonic()

        def run_now(items: list[In]) -> list[Out]:
            # The wait ends when the batch starts on the executor: a shared executor may run other work first.
            now = time.monotonic()
            for pending in batch:
                self._observer_call(self._observer.queue_wait, now - pending.queued_at)
            return self._run_batch(items)

        self._running_batch = batch
        executor = self._given_executor or self._owned_executor
        error: BaseException | None = None
        outputs: list[Out] = []
        try:
            outputs = list(
                await asyncio.get_running_loop().run_in_executor(executor, run_now, [pending.item for pending in batch])
            )
        except asyncio.CancelledError:
            # Only stop() cancels the loop, after its drain timeout; the thread runs on, unheard.
            for pending in batch:
                self._settle(pending, error=Draining(f"{self.name} stopped before this batch finished"))
            raise
        except Exception as exc:
            error = exc
        finally:
            self._running_batch = []
        elapsed = time.monotonic() - started

        self._mean_batch_s = (
            elapsed
            if self._mean_batch_s is None
            else _DURATION_SMOOTHING * elapsed + (1 - _DURATION_SMOOTHING) * self._mean_batch_s
        )
        self._observer_call(self._observer.batch_executed, images, len(batch), elapsed)

        if error is None and len(outputs) != len(batch):
            log.error("%s: run_batch returned %d outputs for %d inputs", self.name, len(outputs), len(batch))
            for pending in batch:
                self._settle(
                    pending,
                    error=BatchFailed(
                        f"{self.name}: the batch failed: run_batch returned {len(outputs)} outputs "
                        f"for {len(batch)} inputs"
                    ),
                )
        elif error is not None:
            log.error("%s: batch of %d requests failed", self.name, len(batch), exc_info=error)
            for pending in batch:
                # One exception object per caller: a shared one would collect every caller's traceback.
                failure = BatchFailed(
                    f"{self.name}: the batch of {len(batch)} requests this request was in failed: "
                    f"{type(error).__name__}: {error}"
                )
                failure.__cause__ = error
                self._settle(pending, error=failure)
        else:
            for pending, output in zip(batch, outputs):
                self._settle(pending, result=output)
