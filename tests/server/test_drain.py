"""Graceful drain of a real `softdimo serve` process: SIGTERM finishes queued and running work, turns readiness
and new work to 503 while the listener stays open, and exits 0; a second signal (SIGINT here, as from a second Ctrl-C) stops at once."""

import asyncio
import signal
import time

import httpx
from conftest import metric
from benchmarks.running import server_process

PROMPT = "a red circle"
SLOW = {"prompt": PROMPT, "n": 2, "steps": 32}  # a batch of its own (max batch 2 images), long enough to queue behind


def _args(bundles, drain_timeout_s: float) -> list[str]:
    return [
        "--weights",
        str(bundles["text"]),
        "--device",
        "cpu",
        "--max-batch-size",
        "2",
        "--max-wait-ms",
        "0",
        "--drain-timeout-s",
        str(drain_timeout_s),
        "--log-level",
        "info",
    ]


async def _until_queued(client: httpx.AsyncClient, requests: int, timeout_s: float = 60.0) -> None:
    """Wait until `requests` are inside the server, at least one of them still waiting in the queue."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = (await client.get("/metrics")).text
        inflight = metric(text, "softdimo_inflight_requests", endpoint="/generate")
        queued = metric(text, "softdimo_queue_depth", endpoint="/generate", model="tiny-text")
        if inflight == requests and queued >= 2:
            return
        assert time.monotonic() < deadline, f"requests never queued: {inflight} in flight, {queued} images queued"
        await asyncio.sleep(0.05)


def test_sigterm_drains_queued_and_running_work_then_exits_0(tiny_bundles, tmp_path):
    log = tmp_path / "server.log"
    with server_process(_args(tiny_bundles, drain_timeout_s=120), log_path=log) as (process, url):

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=180) as client:
                # Six batches of their own: the queue stays non-empty long enough to be seen even on a busy machine.
                work = [
                    asyncio.create_task(client.post("/generate", json={**SLOW, "steps": 64, "seed": 10 * i}))
                    for i in range(6)
                ]
                await _until_queued(client, requests=6)  # one batch running, the rest queued
                process.send_signal(signal.SIGTERM)
                readiness = await client.get("/readyz")
                while readiness.status_code == 200:  # the signal is handled on the server's next loop turn
                    await asyncio.sleep(0.01)
                    readiness = await client.get("/readyz")
                late = await client.post("/generate", json={"prompt": PROMPT})
                answers = await asyncio.gather(*work)
                return readiness, late, answers

        readiness, late, answers = asyncio.run(scenario())
        signalled = time.monotonic()
        code = process.wait(timeout=60)

    assert readiness.status_code == 503 and readiness.json() == {"status": "draining"}
    assert late.status_code == 503 and "draining" in late.json()["detail"] and int(late.headers["retry-after"]) >= 1
    assert [a.status_code for a in answers] == [200] * 6, log.read_text()[-3000:]
    assert all(len(a.json()["data"]) == 2 for a in answers)
    assert code == 0, log.read_text()[-3000:]
    assert time.monotonic() - signalled < 30
    assert "draining" in log.read_text()


def test_a_second_signal_stops_at_once(tiny_bundles, tmp_path):
    log = tmp_path / "server.log"
    with server_process(_args(tiny_bundles, drain_timeout_s=300), log_path=log) as (process, url):

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=180) as client:
                work = [
                    asyncio.create_task(client.post("/generate", json={**SLOW, "steps": 64, "seed": i}))
                    for i in range(6)
                ]
                await _until_queued(client, requests=6)
                process.send_signal(signal.SIGTERM)
                while (await client.get("/readyz")).status_code == 200:
                    await asyncio.sleep(0.01)
                process.send_signal(signal.SIGINT)
                began = time.monotonic()
                code = await asyncio.to_thread(process.wait, 30)
                stopped_in = time.monotonic() - began
                answers = await asyncio.gather(*work, return_exceptions=True)
                return code, stopped_in, answers

        code, stopped_in, answers = asyncio.run(scenario())

    assert code == 1, log.read_text()[-3000:]  # not a clean drain: queued work was refused
    assert stopped_in < 15
    # Queued work was answered 503 or cut off; none of it waited for the 300 s drain.
    assert any(isinstance(a, httpx.TransportError) or a.status_code == 503 for a in answers)
    assert "again: stopping now" in log.read_text()


def test_a_batch_still_waiting_for_company_runs_at_once_on_sigterm(tiny_bundles, tmp_path):
    """The first traffic of each queue, its batch not yet started (waiting 60 s for company): SIGTERM runs it now."""
    log = tmp_path / "server.log"
    args = [
        "--weights",
        str(tiny_bundles["one-step"]),
        "--device",
        "cpu",
        "--max-batch-size",
        "8",
        "--max-wait-ms",
        "60000",
        "--refine-max-wait-ms",
        "60000",
        "--drain-timeout-s",
        "120",
        "--log-level",
        "info",
    ]
    with server_process(args, log_path=log) as (process, url):

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                work = [
                    asyncio.create_task(client.post("/refine", json={"prompt": PROMPT, "seed": i, "steps": 3}))
                    for i in range(4)
                ]
                work += [
                    asyncio.create_task(client.post("/generate", json={"prompt": PROMPT, "seed": i})) for i in range(4)
                ]
                deadline = time.monotonic() + 30
                while True:
                    text = (await client.get("/metrics")).text
                    queued = {
                        e: metric(text, "softdimo_queue_depth", endpoint=e, model="tiny-one-step")
                        for e in ("/refine", "/generate")
                    }
                    if queued == {"/refine": 4, "/generate": 4}:
                        break
                    assert time.monotonic() < deadline, f"never queued: {queued}"
                    await asyncio.sleep(0.02)
                process.send_signal(signal.SIGTERM)
                began = time.monotonic()
                answers = await asyncio.gather(*work)
                return answers, time.monotonic() - began

        answers, seconds = asyncio.run(scenario())
        code = process.wait(timeout=60)

    assert [a.status_code for a in answers] == [200] * 8, log.read_text()[-3000:]
    assert seconds < 30  # nobody sat out the 60 s wait for company once the drain began (the work itself takes seconds)
    assert code == 0
