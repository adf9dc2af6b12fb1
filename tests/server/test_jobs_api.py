"""The jobs API over real sockets: a job answers exactly what its synchronous endpoint answers, is refused at submit
for what that endpoint refuses, reports TTEO progress (also as SSE), and can be cancelled queued or running."""

import json
import re
import time

import httpx
import pytest
from conftest import error_message, metric
from benchmarks.running import server_thread

from server.job_store import JobRecord, SQLiteJobStore
from server.settings import Settings

PROMPT = "a red circle"
LONG = {"endpoint": "refine", "prompt": PROMPT, "n": 8, "steps": 200, "seed": 1}  # seconds of TTEO on the tiny model


@pytest.fixture(scope="module")
def url(tiny_bundles, tmp_path_factory):
    settings = Settings(
        weights=[str(tiny_bundles["one-step"]), str(tiny_bundles["text"])],
        device="cpu",
        max_batch_size=8,
        job_db_path=str(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"),
        job_concurrency=1,
        max_request_cost=4096,
    )
    with server_thread(settings) as base:
        yield base


def wait_for(url: str, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def submit(url: str, body: dict) -> str:
    answer = httpx.post(f"{url}/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert set(job) == {"id", "status", "created"} and job["status"] == "queued"
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    return job["id"]


@pytest.mark.parametrize(
    "endpoint,body",
    [
        ("generate", {"prompt": PROMPT, "n": 2, "seed": 5}),
        ("generate", {"prompt": PROMPT, "model": "tiny-text", "steps": 3, "seed": 9}),
        ("refine", {"prompt": PROMPT, "n": 2, "seed": 5, "steps": 4, "best_of": 2}),
    ],
)
def test_a_job_answers_exactly_what_the_synchronous_endpoint_answers(url, endpoint, body):
    job = wait_for(url, submit(url, {"endpoint": endpoint, **body}))
    assert job["status"] == "succeeded" and job["endpoint"] == endpoint and job["error"] is None, job
    plain = httpx.post(f"{url}/{endpoint}", json=body, timeout=60).json()
    assert set(job["result"]) == set(plain) and job["result"]["data"] == plain["data"]
    if endpoint == "refine":
        assert job["progress"]["step"] == job["progress"]["steps"] == 4
        assert [i["seed"] for i in job["progress"]["images"]] == [5, 6]


def test_a_job_without_a_seed_keeps_the_one_drawn_at_submit(url):
    job = wait_for(url, submit(url, {"endpoint": "generate", "prompt": PROMPT, "n": 2}))
    seeds = [item["seed"] for item in job["result"]["data"]]
    plain = httpx.post(f"{url}/generate", json={"prompt": PROMPT, "n": 2, "seed": seeds[0]}).json()
    assert seeds[1] == seeds[0] + 1 and job["result"]["data"] == plain["data"]


@pytest.mark.parametrize(
    "body",
    [
        {"endpoint": "generate", "prompt": "a purple circle"},
        {"endpoint": "refine", "prompt": PROMPT, "reward": "nope"},
        {"endpoint": "generate", "prompt": PROMPT, "model": "nope"},
        {"endpoint": "generate", "prompt": PROMPT, "steps": 3},
        {"endpoint": "refine", "prompt": PROMPT, "n": 16, "steps": 200, "best_of": 4},
        {"endpoint": "generate", "n": True, "prompt": PROMPT},
        {"endpoint": "refine", "prompt": PROMPT, "model": "tiny-text"},
        {"endpoint": "generate", "class_label": 1, "prompt": PROMPT},
    ],
)
def test_a_body_the_synchronous_endpoint_refuses_is_refused_at_submit_the_same_way(url, body):
    endpoint = body["endpoint"]
    plain = httpx.post(f"{url}/{endpoint}", json={k: v for k, v in body.items() if k != "endpoint"})
    answer = httpx.post(f"{url}/v1/jobs", json=body)
    assert 400 <= plain.status_code < 500 and answer.status_code == plain.status_code, answer.text
    assert error_message(answer)  # an OpenAI error object under /v1/


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"prompt": PROMPT}, "endpoint"),
        ({"endpoint": "edit", "prompt": PROMPT}, "endpoint"),
        ({"endpoint": "refine", "prompt": PROMPT, "stream": True}, "stream"),
        ({"endpoint": "generate", "prompt": PROMPT, "webhook": "not a url"}, "webhook"),
        ({"endpoint": "generate", "prompt": PROMPT, "webhook": "ftp://example.com/x"}, "webhook"),
    ],
)
def test_job_only_fields_are_checked_too(url, body, fragment):
    answer = httpx.post(f"{url}/v1/jobs", json=body)
    assert answer.status_code == 422 and fragment in error_message(answer)


def test_unknown_jobs_and_paths_are_404_in_the_openai_shape(url):
    for method, path in [
        ("GET", "/v1/jobs/job-nope"),
        ("DELETE", "/v1/jobs/job-nope"),
        ("GET", "/v1/jobs/job-nope/events"),
    ]:
        answer = httpx.request(method, f"{url}{path}")
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "job_not_found", (method, path)
    answer = httpx.get(f"{url}/v1/nothing/here")
    assert answer.status_code == 404 and "GET /v1/nothing/here" in error_message(answer)
    assert answer.json()["error"]["code"] != "model_not_found"


def test_prefer_respond_async_turns_a_synchronous_request_into_a_job(url):
    body = {"prompt": PROMPT, "seed": 21, "steps": 2}
    answer = httpx.post(f"{url}/refine", json=body, headers={"Prefer": "respond-async, wait=10"})
    assert answer.status_code == 202 and answer.headers["preference-applied"] == "respond-async"
    job = wait_for(url, answer.json()["id"])
    assert (
        job["endpoint"] == "refine" and job["result"]["data"] == httpx.post(f"{url}/refine", json=body).json()["data"]
    )
    refused = httpx.post(f"{url}/generate", json={"prompt": "a purple circle"}, headers={"Prefer": "respond-async"})
    assert refused.status_code == 422 and "purple" in refused.json()["detail"]


def test_events_stream_progress_then_the_finished_job(url):
    job_id = submit(url, {"endpoint": "refine", "prompt": PROMPT, "seed": 4, "steps": 60})
    received, name = [], None
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((name, json.loads(line.removeprefix("data: "))))
    statuses = [data["status"] for name, data in received if name == "status"]
    steps = [data["step"] for name, data in received if name == "progress"]
    assert statuses[-1] == "succeeded" and "running" in statuses
    assert steps and steps == sorted(steps) and steps[-1] == 60
    (last, final) = received[-1]
    assert last == "succeeded" and final == httpx.get(f"{url}/v1/jobs/{job_id}").json()


def test_cancelling_a_queued_job_means_it_never_runs_and_a_running_refine_stops_at_its_next_step(url):
    running = submit(url, LONG)
    queued = submit(url, {**LONG, "seed": 2})
    wait_for(url, running, statuses=("running",))
    cancelled = httpx.delete(f"{url}/v1/jobs/{queued}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    job = wait_for(url, running, statuses=("running",))
    while not job["progress"]:  # at least one step reported before it is stopped
        job = wait_for(url, running, statuses=("running",))
    began = time.monotonic()
    assert httpx.delete(f"{url}/v1/jobs/{running}").json()["status"] == "cancelled"
    text = ""
    while metric(text, "softdimo_jobs_total", endpoint="refine", status="cancelled") < 1:
        assert time.monotonic() - began < 30, "the running job did not stop"
        time.sleep(0.05)
        text = httpx.get(f"{url}/metrics").text
    stopped = httpx.get(f"{url}/v1/jobs/{running}").json()
    assert stopped["status"] == "cancelled" and stopped["result"] is None and stopped["progress"]["step"] < 200
    assert httpx.get(f"{url}/v1/jobs/{queued}").json()["progress"] is None  # never ran
    # The device is free again at once: a short job finishes long before the long one would have.
    short = submit(url, {"endpoint": "generate", "prompt": PROMPT})
    assert wait_for(url, short, timeout_s=20)["status"] == "succeeded"
    assert httpx.delete(f"{url}/v1/jobs/{running}").status_code == 200  # cancelling twice is no error
    finished = httpx.delete(f"{url}/v1/jobs/{short}")
    assert finished.status_code == 409 and "already succeeded" in error_message(finished)
    assert httpx.get(f"{url}/v1/jobs/{short}").json()["status"] == "succeeded"


def test_job_work_is_metered_by_lane(url):
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "softdimo_queue_wait_seconds_count", endpoint="/generate", lane="background") > 0
    assert metric(text, "softdimo_queue_wait_seconds_count", endpoint="/generate", lane="interactive") > 0
    assert metric(text, "softdimo_jobs_total", endpoint="generate", status="succeeded") > 0


def test_an_api_key_may_hold_only_max_queued_jobs_per_key_queued_jobs(tiny_bundles, tmp_path):
    settings = Settings(
        weights=[str(tiny_bundles["one-step"])],
        device="cpu",
        max_batch_size=8,
        api_key="k",
        max_queued_jobs_per_key=2,
        job_concurrency=1,
        job_db_path=str(tmp_path / "jobs.sqlite3"),
    )
    with server_thread(settings) as base, httpx.Client(base_url=base, headers={"Authorization": "Bearer k"}) as client:
        assert httpx.post(f"{base}/v1/jobs", json=LONG).status_code == 401
        ids = [client.post("/v1/jobs", json={**LONG, "seed": seed}).json()["id"] for seed in (1, 2, 3)]
        while client.get(f"/v1/jobs/{ids[0]}").json()["status"] != "running":  # the first is no longer queued
            time.sleep(0.05)
        refused = client.post("/v1/jobs", json=LONG)
        assert refused.status_code == 429 and "max_queued_jobs_per_key" in error_message(refused)
        assert int(refused.headers["retry-after"]) >= 1
        client.delete(f"/v1/jobs/{ids[1]}")  # a queued one leaves: room for one more
        room = client.post("/v1/jobs", json=LONG)
        assert room.status_code == 202
        for job_id in [*ids, room.json()["id"]]:
            client.delete(f"/v1/jobs/{job_id}")


def test_the_store_backlog_is_exported_as_softdimo_jobs_queued(tiny_bundles, tmp_path):
    settings = Settings(
        weights=[str(tiny_bundles["one-step"])],
        device="cpu",
        max_batch_size=8,
        job_concurrency=1,
        job_db_path=str(tmp_path / "jobs.sqlite3"),
    )

    def queued_gauge_reaches(base: str, count: int) -> bool:
        deadline = time.monotonic() + 15  # the runner refreshes it every 5 s
        while time.monotonic() < deadline:
            if re.search(rf"^softdimo_jobs_queued {count}\.0$", httpx.get(f"{base}/metrics").text, re.M):
                return True
            time.sleep(0.2)
        return False

    with server_thread(settings) as base:
        ids = [submit(base, {**LONG, "seed": seed}) for seed in (1, 2, 3)]
        wait_for(base, ids[0], statuses=("running",))  # one runs (job_concurrency 1), two wait
        assert queued_gauge_reaches(base, 2)
        for job_id in ids:
            httpx.delete(f"{base}/v1/jobs/{job_id}")
        assert queued_gauge_reaches(base, 0)


def test_a_job_whose_process_died_each_time_it_ran_fails_instead_of_taking_down_the_next(tiny_bundles, tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)
    for job_id in ("poison", "healthy"):
        body = {"prompt": PROMPT, "n": 1, "seed": 3}
        store.add(JobRecord(id=job_id, endpoint="generate", body=body, created=time.time()), max_queued_per_owner=None)
    for _ in range(2):  # two processes claimed it and died before finishing: their leases ran out at once
        assert store.claim(worker="died", lease_s=0).id == "poison"
        time.sleep(0.01)
    store.close()
    settings = Settings(
        weights=[str(tiny_bundles["one-step"])], device="cpu", job_db_path=str(path), job_max_attempts=2
    )
    with server_thread(settings) as base:
        poison, healthy = wait_for(base, "poison"), wait_for(base, "healthy")
    assert poison["status"] == "failed" and poison["result"] is None
    assert poison["error"]["status"] == 500 and "stopped 2 times" in poison["error"]["detail"]
    assert healthy["status"] == "succeeded" and healthy["result"]["data"][0]["seed"] == 3


def test_a_wrong_method_on_a_job_lists_every_method_of_the_path(url):
    answer = httpx.put(f"{url}/v1/jobs/job-x")
    assert answer.status_code == 405 and answer.headers["allow"] == "DELETE, GET" and "PUT" in error_message(answer)


def test_interactive_generate_runs_between_the_steps_of_a_running_refine_and_changes_no_image(url):
    body = {**LONG, "steps": 100, "seed": 11}
    idle = [httpx.post(f"{url}/generate", json={"prompt": PROMPT, "seed": seed}).json()["data"] for seed in range(5)]
    job_id = submit(url, body)
    job = wait_for(url, job_id, statuses=("running",))
    while not job["progress"]:
        job = wait_for(url, job_id, statuses=("running",))
    took, during = [], []
    for seed in range(5):
        began = time.monotonic()
        during.append(httpx.post(f"{url}/generate", json={"prompt": PROMPT, "seed": seed}).json()["data"])
        took.append(time.monotonic() - began)
    job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    assert job["status"] == "running" and job["progress"]["step"] < 100  # all served while the refine batch ran
    assert max(took) < 1.0, took  # a step's time, not the rest of the batch (seconds)
    assert during == idle
    finished = wait_for(url, job_id)
    plain = {k: v for k, v in body.items() if k != "endpoint"}
    assert finished["result"]["data"] == httpx.post(f"{url}/refine", json=plain, timeout=120).json()["data"]
