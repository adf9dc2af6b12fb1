"""The device's one thread, fed by two lanes: interactive work goes first (also between the pieces of a running
/refine batch), background work after a bounded wait."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Callable

INTERACTIVE = "interactive"  # synchronous /generate and the Images API: someone is waiting on a page
BACKGROUND = "background"  # /refine (seconds per batch) and jobs
LANES = (INTERACTIVE, BACKGROUND)


class DeviceLanes:
    """Runs submitted calls one at a time on one thread, in arrival order within a lane. Between calls, the
    interactive lane goes first, except that after `burst` interactive calls in a row have passed waiting
    background work, one background call runs: background work waits at most `burst` calls, never forever."""

    def __init__(self, *, burst: int, thread_name: str):
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self._burst = burst
        self._queues: dict[str, collections.deque] = {lane: collections.deque() for lane in LANES}
        self._passed = 0  # interactive calls run in a row while background work waited
        self._closed = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def executor(self, lane: str) -> LaneExecutor:
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}; lanes: {', '.join(LANES)}")
        return LaneExecutor(self, lane)

    def submit(self, lane: str, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the device lanes are shut down")
            self._queues[lane].append((future, fn, args, kwargs))
            self._ready.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._ready:
            self._closed = True
            if cancel_futures:
                for queue in self._queues.values():
                    while queue:
                        queue.popleft()[0].cancel()
            self._ready.notify()
        if wait:
            self._thread.join()

    def run_waiting_interactive(self) -> int:
        """Run, here and now, interactive calls waiting at this moment; for a long background call (a /refine batch,
        between its pieces of work: softdimo.tteo.Chunks) to let interactive work through. The lane rule holds inside
        it too: once `burst` interactive calls in a row have passed it, the background call goes on for one piece
        before any more run. Only on the device thread; how many ran."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("run_waiting_interactive runs on the device thread only")
        with self._ready:
            if self._passed >= self._burst:
                self._passed = 0
                return 0
            queue = self._queues[INTERACTIVE]
            waiting = [queue.popleft() for _ in range(min(len(queue), self._burst - self._passed))]
            self._passed += len(waiting)
        for call in waiting:
            self._call(call)
        return len(waiting)

    def _next(self) -> tuple | None:
        """The next call to run, by the lane rule; None once shut down and empty. Holds the lock."""
        interactive, background = self._queues[INTERACTIVE], self._queues[BACKGROUND]
        while not interactive and not background:
            if self._closed:
                return None
            self._ready.wait()
        if interactive and not (background and self._passed >= self._burst):
            self._passed = self._passed + 1 if background else 0
            return interactive.popleft()
        self._passed = 0
        return background.popleft()

    def _run(self) -> None:
        while True:
            with self._ready:
                call = self._next()
            if call is None:
                return
            self._call(call)

    @staticmethod
    def _call(call: tuple) -> None:
        future, fn, args, kwargs = call
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the caller, as a ThreadPoolExecutor does
            future.set_exception(exc)


class LaneExecutor(concurrent.futures.Executor):
    """One lane of DeviceLanes as an Executor, for loop.run_in_executor and the batchers."""

    def __init__(self, lanes: DeviceLanes, lane: str):
        self.lanes, self.lane = lanes, lane

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        return self.lanes.submit(self.lane, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.lanes.shutdown(wait, cancel_futures=cancel_futures)
