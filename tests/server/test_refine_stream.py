"""Streaming /refine over server-sent events, read with an httpx streaming client: one event per TTEO step,
then exactly the JSON a plain call returns; a refused request is a plain JSON error; a client that leaves
mid-stream is counted and does not disturb its batch-mates."""

import asyncio
import json

import httpx
import pytest
from conftest import metric
from benchmarks.running import server_thread

from server.settings import Settings

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def url(tiny_bundles):
    settings = Settings(
        weights=[str(tiny_bundles["one-step"])], device="cpu", max_batch_size=8, refine_max_wait_ms=1500
    )
    with server_thread(settings) as base:
        yield base


def events(lines) -> list[tuple[str, dict]]:
    """(event, data) pairs from the lines of a text/event-stream."""
    out, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            out.append((name, json.loads(line.removeprefix("data: "))))
    return out


def comparable(answer: dict) -> list[dict]:
    return answer["data"]  # images, seeds, rewards: everything but the id, time stamp and timing


def test_a_stream_reports_every_step_then_the_plain_answer(url):
    body = {"prompt": PROMPT, "n": 2, "seed": 11, "steps": 4}
    with httpx.stream("POST", f"{url}/refine", json=body | {"stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        received = events(r.iter_lines())
    steps = [data for name, data in received if name == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all([image["seed"] for image in s["images"]] == [11, 12] for s in steps)
    ((name, final),) = [(n, d) for n, d in received if n != "step"]
    assert name == "result"
    plain = httpx.post(f"{url}/refine", json=body, timeout=60).json()
    assert set(final) == set(plain) and comparable(final) == comparable(plain)


def test_a_refused_stream_is_an_ordinary_json_error(url):
    r = httpx.post(f"{url}/refine", json={"prompt": "a purple circle", "stream": True})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json" and "purple" in r.json()["detail"]
    r = httpx.post(f"{url}/refine", json={"prompt": PROMPT, "stream": True, "reward": "nope"})
    assert r.status_code == 404 and "unknown reward" in r.json()["detail"]


def test_a_client_leaving_mid_stream_is_counted_and_its_batch_mate_is_undisturbed(url):
    mate = {"prompt": "a blue square", "seed": 5, "steps": 30}
    alone = httpx.post(f"{url}/refine", json=mate, timeout=60).json()
    before = metric(httpx.get(f"{url}/metrics").text, "softdimo_requests_total", endpoint="/refine", status="499")
    refined_before = metric(httpx.get(f"{url}/metrics").text, "softdimo_batch_size_count", endpoint="/refine")

    async def run() -> dict:
        async with httpx.AsyncClient(timeout=60) as client:

            async def leave_after_one_step() -> None:
                async with client.stream(
                    "POST", f"{url}/refine", json={"prompt": PROMPT, "seed": 1, "steps": 30, "stream": True}
                ) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("event: step"):
                            return  # closes the connection mid-stream

            leaving = asyncio.create_task(leave_after_one_step())
            await asyncio.sleep(
                0.05
            )  # well inside the 1.5 s the first /refine waits for company, even on a busy machine
            answer = await client.post(f"{url}/refine", json=mate)
            await leaving
            return answer.json()

    together = asyncio.run(run())
    assert comparable(together) == comparable(alone)
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "softdimo_batch_size_count", endpoint="/refine") == refined_before + 1  # one batch held both
    for _ in range(50):  # the stream's end is counted when the server notices the disconnect
        if (
            metric(httpx.get(f"{url}/metrics").text, "softdimo_requests_total", endpoint="/refine", status="499")
            == before + 1
        ):
            break
        asyncio.run(asyncio.sleep(0.1))
    assert (
        metric(httpx.get(f"{url}/metrics").text, "softdimo_requests_total", endpoint="/refine", status="499")
        == before + 1
    )
