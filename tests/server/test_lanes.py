"""The device lanes: interactive calls run first, waiting background calls run after at most `burst` of them."""

import threading

import pytest

from server.lanes import BACKGROUND, INTERACTIVE, DeviceLanes


def run_order(burst: int, submissions: list[str]) -> list[str]:
    """The order in which calls submitted while the device was busy run."""
    lanes = DeviceLanes(burst=burst, thread_name="test-lanes")
    started, gate, ran = threading.Event(), threading.Event(), []
    blocker = lanes.submit(INTERACTIVE, lambda: (started.set(), gate.wait()))  # holds the device while the rest queue
    started.wait(10)
    futures = [lanes.submit(lane, ran.append, f"{lane[0]}{i}") for i, lane in enumerate(submissions)]
    gate.set()
    for future in [blocker, *futures]:
        future.result(timeout=10)
    lanes.shutdown()
    return ran


def test_interactive_work_goes_first_but_background_work_waits_at_most_burst_calls():
    order = run_order(2, [BACKGROUND, BACKGROUND, INTERACTIVE, INTERACTIVE, INTERACTIVE, INTERACTIVE, INTERACTIVE])
    assert order == ["i2", "i3", "b0", "i4", "i5", "b1", "i6"]


def test_lanes_keep_arrival_order_and_errors_reach_the_caller():
    assert run_order(4, [BACKGROUND, BACKGROUND, BACKGROUND]) == ["b0", "b1", "b2"]
    lanes = DeviceLanes(burst=1, thread_name="test-lanes")
    with pytest.raises(ZeroDivisionError):
        lanes.executor(BACKGROUND).submit(lambda: 1 / 0).result(timeout=10)
    lanes.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        lanes.submit(INTERACTIVE, print)


def test_a_long_background_call_lets_waiting_interactive_calls_run_in_its_middle():
    lanes = DeviceLanes(burst=4, thread_name="test-lanes")
    started, gate, ran = threading.Event(), threading.Event(), []

    def long_background_call():
        started.set()
        gate.wait(10)
        ran.append("b: first half")
        lanes.run_waiting_interactive()  # as between two TTEO steps
        ran.append("b: second half")

    background = lanes.submit(BACKGROUND, long_background_call)
    started.wait(10)
    interactive = [lanes.submit(INTERACTIVE, ran.append, f"i{i}") for i in range(2)]
    gate.set()
    for future in [background, *interactive]:
        future.result(timeout=10)
    assert ran == ["b: first half", "i0", "i1", "b: second half"]
    with pytest.raises(RuntimeError, match="device thread"):
        lanes.run_waiting_interactive()
    lanes.shutdown()
