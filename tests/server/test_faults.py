"""Fault isolation: a failing batch fails only its own requests, out-of-memory batches are retried in halves,
and the server stays ready throughout. Faults are injected into a real tiny model served by a real server."""

import base64
from dataclasses import dataclass, field, fields

import httpx
import numpy as np
import pytest
import torch
from conftest import metric, post_concurrently

from benchmarks.running import server_thread
from server.engine import Engine, ServedModel, load_model
from server.jobs import EditJob, EditRefineJob, GenerateJob, RefineJob, is_out_of_memory, run_splitting_on_oom
from server.settings import Settings
from softdimo.images import decode_image
from softdimo.seeding import derived_seed
from softdimo.tteo import TTEOSettings

PROMPT = "a red circle"


@dataclass
class FaultyModel(ServedModel):
    """A served model that runs out of memory on batches above `oom_above` images, or fails on `poison_seed`."""

    oom_above: int | None = None
    cpu_oom: bool = False  # raise the CPU allocator's RuntimeError instead of CUDA's error
    poison_seed: int | None = None
    batch_sizes: list[int] = field(default_factory=list)  # images in each attempted batch

    def generate_batch(self, jobs):
        images = sum(job.n for job in jobs)
        self.batch_sizes.append(images)
        if self.oom_above is not None and images > self.oom_above:
            if self.cpu_oom:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.poison_seed is not None and any(self.poison_seed in job.seeds for job in jobs):
            raise ValueError(f"seed {self.poison_seed} trips a bug")
        return super().generate_batch(jobs)


@pytest.fixture(scope="module")
def model(tiny_bundles) -> FaultyModel:
    base = load_model(tiny_bundles["text"], torch.device("cpu"))
    return FaultyModel(**{f.name: getattr(base, f.name) for f in fields(ServedModel)})


@pytest.fixture(scope="module")
def url(model):
    settings = Settings(weights=[], device="cpu", max_batch_size=8, max_wait_ms=300)
    with server_thread(settings, engine=Engine([model], torch.device("cpu"))) as base:
        yield base


@pytest.fixture(autouse=True)
def no_faults(model):
    model.oom_above, model.cpu_oom, model.poison_seed = None, False, None
    model.batch_sizes.clear()
    yield
    model.oom_above, model.cpu_oom, model.poison_seed = None, False, None


def _images(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [decode_image(base64.b64decode(d["b64_json"])) for d in response.json()["data"]]


def test_out_of_memory_batches_are_split_until_they_fit_and_give_the_same_images(url, model):
    bodies = [
        {"prompt": PROMPT, "seed": 10, "n": 3},
        {"prompt": PROMPT, "seed": 20, "n": 2},
        {"prompt": PROMPT, "seed": 30, "n": 3},
    ]
    expected = [_images(r) for r in post_concurrently(url, "/generate", bodies)]
    assert 8 in model.batch_sizes  # the three requests shared one batch of 8

    before = metric(
        httpx.get(f"{url}/metrics").text, "softdimo_batch_splits_total", endpoint="/generate", model="tiny-text"
    )
    model.oom_above = 2
    model.batch_sizes.clear()
    responses = post_concurrently(url, "/generate", bodies)
    for response, body, images in zip(responses, bodies, expected):
        assert [d["seed"] for d in response.json()["data"]] == [body["seed"] + i for i in range(body["n"])]
        assert all((a == b).all() for a, b in zip(_images(response), images))
    # 8 failed, each half of 4 failed, the four quarters of 2 ran; the second request was split across two halves.
    assert model.batch_sizes == [8, 4, 2, 2, 4, 2, 2]
    after = metric(
        httpx.get(f"{url}/metrics").text, "softdimo_batch_splits_total", endpoint="/generate", model="tiny-text"
    )
    assert after - before == 3  # the batch of 8, then both of its halves
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_the_cpu_allocators_out_of_memory_error_is_split_too(url, model):
    expected = _images(httpx.post(f"{url}/generate", json={"prompt": PROMPT, "seed": 5, "n": 2}))
    model.oom_above, model.cpu_oom = 1, True
    model.batch_sizes.clear()
    got = _images(httpx.post(f"{url}/generate", json={"prompt": PROMPT, "seed": 5, "n": 2}, timeout=60))
    assert model.batch_sizes == [2, 1, 1] and all((a == b).all() for a, b in zip(got, expected))


def test_a_single_image_that_runs_out_of_memory_fails_with_a_clear_500_and_the_server_recovers(url, model):
    model.oom_above = 0
    r = httpx.post(f"{url}/generate", json={"prompt": PROMPT, "n": 2}, timeout=60)
    assert r.status_code == 500 and "OutOfMemoryError" in r.json()["detail"] and "out of memory" in r.json()["detail"]
    assert model.batch_sizes == [2, 1]  # split once, then the first image failed alone and no further work was wasted
    assert httpx.get(f"{url}/readyz").status_code == 200
    model.oom_above = None
    assert httpx.post(f"{url}/generate", json={"prompt": PROMPT, "n": 2}).status_code == 200


def test_a_failing_batch_fails_only_its_own_request(url, model):
    model.poison_seed = 13
    before = httpx.get(f"{url}/metrics").text
    # Different sampling steps never share a batch: the poisoned request runs alone.
    bodies = [{"prompt": PROMPT, "seed": 13, "steps": 2}] + [
        {"prompt": PROMPT, "seed": s, "steps": 3} for s in (1, 14, 40)
    ]
    responses = post_concurrently(url, "/generate", bodies)
    assert responses[0].status_code == 500
    detail = responses[0].json()["detail"]
    assert "ValueError" in detail and "seed 13 trips a bug" in detail
    assert [r.status_code for r in responses[1:]] == [200, 200, 200]
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert httpx.post(f"{url}/generate", json={"prompt": PROMPT, "seed": 99}).status_code == 200
    after = httpx.get(f"{url}/metrics").text
    labels = dict(endpoint="/generate", model="tiny-text", status="500")
    assert metric(after, "softdimo_requests_total", **labels) == metric(before, "softdimo_requests_total", **labels) + 1


def test_a_non_memory_error_is_not_retried(url, model):
    model.poison_seed = 7
    assert httpx.post(f"{url}/generate", json={"prompt": PROMPT, "seed": 7, "n": 4}).status_code == 500
    assert model.batch_sizes == [4]


def test_splitting_keeps_every_image_with_its_own_request_and_seed():
    jobs = [GenerateJob(condition=torch.zeros(1, 1), seed=s, n=n) for s, n in [(0, 3), (100, 1), (200, 5)]]
    attempts = []

    def run(batch):
        attempts.append(sum(job.n for job in batch))
        if sum(job.n for job in batch) > 2:
            raise RuntimeError("CUDA error: out of memory")
        return [job.seeds for job in batch]

    assert run_splitting_on_oom(run, jobs) == [[0, 1, 2], [100], [200, 201, 202, 203, 204]]
    assert attempts[0] == 9 and max(attempts[1:3]) <= 5


def test_a_refine_split_in_parts_keeps_each_images_candidates():
    job = RefineJob(
        condition=torch.zeros(1, 1), text=PROMPT, seed=10, n=3, settings=TTEOSettings(best_of=2), reward="r"
    )
    rows = tuple((seed, derived_seed(seed, 1)) for seed in (10, 11, 12))
    assert job.candidates == rows
    head, tail = job.split(1)
    assert (head.seeds, head.candidates) == ([10], rows[:1])
    assert (tail.seeds, tail.candidates) == ([11, 12], rows[1:])


def test_an_edit_refine_split_in_parts_keeps_each_images_repainted_tokens_and_candidates():
    repaint = torch.eye(3, 5, dtype=torch.bool)
    edit = EditJob(image=np.zeros((8, 8, 3), np.uint8), repaint=repaint, condition=torch.zeros(1, 1), seed=10, n=3)
    job = EditRefineJob(edit=edit, text=PROMPT, settings=TTEOSettings(best_of=2), reward="r")
    rows = tuple((seed, derived_seed(seed, 1)) for seed in (10, 11, 12))
    assert job.candidates == rows
    head, tail = job.split(1)
    assert (head.seeds, head.candidates, head.edit.repaint.tolist()) == ([10], rows[:1], repaint[:1].tolist())
    assert (tail.seeds, tail.candidates, tail.edit.repaint.tolist()) == ([11, 12], rows[1:], repaint[1:].tolist())


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not the allocator's error type
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
