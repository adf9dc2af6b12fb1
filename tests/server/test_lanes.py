"""The device lanes: interactive calls run first, waiting background calls run after at most `burst` of them, and
between the pieces of a running /refine batch."""

import threading

import httpx
import numpy as np
import pytest
import torch

from benchmarks.running import server_thread
from server.engine import Engine, load_model
from server.jobs import GenerateJob, RefineJob
from server.lanes import BACKGROUND, INTERACTIVE, DeviceLanes
from server.settings import Settings
from softdimo.tteo import Chunks
from softdimo.warmup import example_inputs


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


def test_inside_a_background_call_interactive_calls_pass_it_at_most_burst_at_a_time():
    lanes = DeviceLanes(burst=2, thread_name="test-lanes")
    started, gate, ran = threading.Event(), threading.Event(), []

    def background_call_in_pieces():
        started.set()
        gate.wait(10)
        for piece in range(4):
            ran.append(f"b{piece}")
            lanes.run_waiting_interactive()  # as between two pieces of TTEO work

    background = lanes.submit(BACKGROUND, background_call_in_pieces)
    started.wait(10)
    interactive = [lanes.submit(INTERACTIVE, ran.append, f"i{i}") for i in range(5)]
    gate.set()
    for future in [background, *interactive]:
        future.result(timeout=10)
    # two interactive calls pass, then a piece goes on before more run: the background call is never starved
    assert ran == ["b0", "i0", "i1", "b1", "b2", "i2", "i3", "b3", "i4"]
    lanes.shutdown()


class RecordedReward:
    """A model's reward that records the images of each call in `events`, and on call number `hold_at` waits for
    `gate`, setting `held` (so that a test can queue work while a piece of TTEO is in progress)."""

    def __init__(self, reward, events: list, hold_at: int | None = None):
        self.reward, self.events, self.hold_at, self.name = reward, events, hold_at, reward.name
        self.calls = 0
        self.held, self.gate = threading.Event(), threading.Event()

    def score(self, images, prompts):
        self.events.append(len(images))
        self.calls += 1
        if self.calls == self.hold_at:
            self.held.set()
            self.gate.wait(10)
        return self.reward.score(images, prompts)


def recorded_model(bundle, events: list, hold_at: int | None = None):
    model = load_model(bundle, torch.device("cpu"))
    name = model.rewards[0]
    model.pipeline.rewards[name] = RecordedReward(model.pipeline.rewards[name], events, hold_at)
    return model, model.pipeline.rewards[name]


def test_an_interactive_call_runs_within_the_refine_step_it_arrived_in(tiny_bundles):
    events = []
    # four images in pieces of one: four pieces start the refine, the fifth reward call is the first step's first
    model, reward = recorded_model(tiny_bundles["one-step"], events, hold_at=5)
    condition, (text,) = example_inputs(model.pipeline, 1)
    settings = model.pipeline.tteo.for_request(steps=2)
    job = RefineJob(condition=condition, text=text, seed=3, n=4, settings=settings, reward=model.rewards[0])
    generate = GenerateJob(condition=condition, seed=7, n=2)
    lanes = DeviceLanes(burst=4, thread_name="test-lanes")
    chunks = Chunks(1, pause=lanes.run_waiting_interactive)
    refined = lanes.submit(BACKGROUND, model.refine_batch, [job], chunks=chunks)
    assert reward.held.wait(60)  # the first step's first piece is running

    def interactive_call():
        events.append("generate")
        return model.generate_batch([generate])

    generated = lanes.submit(INTERACTIVE, interactive_call)
    reward.gate.set()
    refined, generated = refined.result(timeout=60), generated.result(timeout=60)
    lanes.shutdown()
    # served after the piece in progress, before the step's three other pieces, the second step and the end
    assert events == [1] * 5 + ["generate"] + [1] * 11
    reward.hold_at = None
    alone = model.refine_batch([job])
    assert all(np.array_equal(a.image, b.image) for a, b in zip(alone[0], refined[0]))  # nor did it change an image
    assert all(np.array_equal(a, b) for a, b in zip(model.generate_batch([generate])[0], generated[0]))


def test_the_server_runs_refine_batches_in_pieces_of_refine_chunk_images(tiny_bundles):
    events = []
    model, _ = recorded_model(tiny_bundles["one-step"], events)
    settings = Settings(weights=[], device="cpu", max_batch_size=8, refine_chunk=2)
    with server_thread(settings, engine=Engine([model], torch.device("cpu"))) as url:
        events.clear()  # the warm-up's
        body = {"prompt": "a red circle", "n": 3, "seed": 1, "steps": 2}
        assert httpx.post(f"{url}/refine", json=body, timeout=60).status_code == 200
    assert events == [2, 1] * 4  # the start, two steps and the end, each over three images in pieces of 2 + 1
