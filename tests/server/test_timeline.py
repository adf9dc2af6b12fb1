"""softdimo_request_stage_seconds through a real server: every answered request observed once in each stage, the
stages covering its whole time, refused requests not observed."""

import httpx
import pytest
from benchmarks.running import server_thread
from conftest import metric

from server.metrics import REQUEST_STAGES
from server.settings import Settings


@pytest.fixture(scope="module")
def url(tiny_bundles):
    settings = Settings(weights=[str(tiny_bundles["one-step"])], device="cpu", max_batch_size=4, max_wait_ms=5)
    with server_thread(settings) as base:
        yield base


def _stages(text: str, endpoint: str, suffix: str) -> dict[str, float]:
    name = f"softdimo_request_stage_seconds_{suffix}"
    return {stage: metric(text, name, endpoint=endpoint, stage=stage) for stage in REQUEST_STAGES}


def test_every_answered_request_is_observed_in_every_stage(url, one_thread):
    idle = httpx.get(f"{url}/metrics").text
    assert _stages(idle, "/generate", "count") == dict.fromkeys(REQUEST_STAGES, 0.0)  # exported before any request
    with httpx.Client(base_url=url, timeout=60) as client:
        for seed in range(3):
            assert client.post("/generate", json={"prompt": "a red circle", "seed": seed}).status_code == 200
        png = client.post("/generate", json={"prompt": "a red circle"}, headers={"Accept": "image/png"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        for seed in range(2):
            assert client.post("/refine", json={"prompt": "a red circle", "seed": seed, "steps": 1}).status_code == 200
        assert client.post("/v1/images/generations", json={"prompt": "a red circle"}).status_code == 200
        text = client.get("/metrics").text

    for endpoint, answered in (("/generate", 4), ("/refine", 2), ("/v1/images/generations", 1)):
        assert _stages(text, endpoint, "count") == dict.fromkeys(REQUEST_STAGES, answered), endpoint
        sums = _stages(text, endpoint, "sum")
        assert all(seconds > 0 for seconds in sums.values()), (endpoint, sums)
    generate = _stages(text, "/generate", "sum")
    # The stages run from arrival to the answer written, so they cover the handler's own span of each request...
    handled = metric(text, "softdimo_request_duration_seconds_sum", endpoint="/generate")
    assert sum(generate.values()) >= handled > 0
    # ...and the queue stage holds the wait for a batch, which the batcher measures from inside the queue.
    waited = metric(text, "softdimo_queue_wait_seconds_sum", endpoint="/generate", lane="interactive")
    assert generate["queue"] >= waited > 0


def test_refused_and_streamed_requests_are_not_observed(url, one_thread):
    before = _stages(httpx.get(f"{url}/metrics").text, "/generate", "count")
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/generate", json={"prompt": "a purple circle"}).status_code == 422  # not in the vocabulary
        two_as_one_image = client.post(
            "/generate", json={"prompt": "a red circle", "n": 2}, headers={"Accept": "image/png"}
        )
        assert two_as_one_image.status_code == 406
        refine_before = _stages(client.get("/metrics").text, "/refine", "count")
        stream = client.post("/refine", json={"prompt": "a red circle", "steps": 1, "stream": True})
        assert stream.status_code == 200 and "event: result" in stream.text
        text = client.get("/metrics").text
    assert _stages(text, "/generate", "count") == before
    assert _stages(text, "/refine", "count") == refine_before
