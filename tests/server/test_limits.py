"""Limits on what one request may ask for, how much may queue, and how large a body may be; no bad input gets a 5xx."""

import json

import httpx
import pytest
from conftest import error_message, metric, post_concurrently
from benchmarks.running import server_thread

from server.settings import Settings

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def url(tiny_bundles):
    # The teacher samples 4 steps by default, the one-step model refines 3 TTEO steps by default.
    settings = Settings(
        weights=[str(tiny_bundles["text"]), str(tiny_bundles["one-step"])],
        device="cpu",
        max_batch_size=2,
        max_request_cost=12,
        max_queue_cost=64,
        max_body_bytes=1024,
    )
    with server_thread(settings) as base:
        yield base


@pytest.mark.parametrize(
    "path,body,terms",
    [
        (
            "/generate",
            {"prompt": PROMPT, "n": 4},
            "4 images x 4 sampling steps = 16",
        ),  # the model's default steps count
        ("/generate", {"prompt": PROMPT, "n": 3, "steps": 5}, "3 images x 5 sampling steps = 15"),
        ("/v1/images/generations", {"prompt": PROMPT, "n": 4}, "= 16"),
        (
            "/refine",
            {"prompt": PROMPT, "model": "tiny-one-step", "steps": 5, "best_of": 3},
            "1 images x 5 TTEO steps x best_of 3 = 15",
        ),
        ("/refine", {"prompt": PROMPT, "model": "tiny-one-step", "n": 5}, "5 images x 3 TTEO steps x best_of 1 = 15"),
    ],
)
def test_a_request_over_max_request_cost_is_a_422_naming_the_limit(url, path, body, terms):
    r = httpx.post(f"{url}{path}", json=body)
    assert r.status_code == 422, r.text
    detail = error_message(r)
    assert terms in detail and "max_request_cost = 12" in detail


def test_a_request_at_max_request_cost_is_served(url):
    assert httpx.post(f"{url}/generate", json={"prompt": PROMPT, "n": 3, "seed": 1}).status_code == 200  # 3 x 4 steps
    one_step = httpx.post(
        f"{url}/generate", json={"prompt": PROMPT, "model": "tiny-one-step", "n": 12}
    )  # one step each
    assert one_step.status_code == 200 and len(one_step.json()["data"]) == 12


def test_max_queue_cost_must_hold_the_largest_request():
    with pytest.raises(ValueError, match="max_queue_cost"):
        Settings(weights=[], max_request_cost=100, max_queue_cost=99)


def test_a_flood_beyond_the_queued_cost_gets_only_200_and_429_and_the_server_stays_ready(tiny_bundles):
    # Room for 64 images but a cost of only 8: two requests of 1 image x 4 steps.
    settings = Settings(
        weights=[str(tiny_bundles["text"])],
        device="cpu",
        max_batch_size=1,
        max_queue=64,
        max_wait_ms=0,
        max_request_cost=8,
        max_queue_cost=8,
    )
    with server_thread(settings) as base:
        responses = post_concurrently(base, "/generate", [{"prompt": PROMPT, "seed": i} for i in range(16)])
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= 2
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and "max_queue_cost = 8" in r.json()["detail"]
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert httpx.post(f"{base}/generate", json={"prompt": PROMPT}).status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert metric(metrics, "softdimo_rejected_total", endpoint="/generate", reason="queue_full") == statuses.count(
            429
        )
        assert metric(metrics, "softdimo_requests_total", endpoint="/generate", status="429") == statuses.count(429)


def test_a_declared_body_over_max_body_bytes_is_413_before_parsing(url):
    body = json.dumps({"prompt": PROMPT, "model": "x" * 2000}).encode()
    r = httpx.post(f"{url}/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"] == "the request body exceeds max_body_bytes = 1024 bytes"
    # Not JSON at all: refused for its size, not its content.
    assert (
        httpx.post(f"{url}/refine", content=b"\xff" * 5000, headers={"content-type": "application/json"}).status_code
        == 413
    )


def test_a_chunked_body_over_max_body_bytes_is_413(url):
    def chunks():
        yield b'{"prompt": "a red circle", "model": "'
        for _ in range(50):
            yield b"y" * 100
        yield b'"}'

    r = httpx.post(f"{url}/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413 and "max_body_bytes = 1024" in r.json()["detail"]
    # A small chunked body is read and served as usual.
    small = httpx.post(
        f"{url}/generate",
        content=iter([b'{"prompt": ', b'"a red circle"}']),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200


def test_413s_are_counted(url):
    before = metric(httpx.get(f"{url}/metrics").text, "softdimo_requests_total", endpoint="/generate", status="413")
    httpx.post(f"{url}/generate", content=b"{" + b" " * 2000 + b"}", headers={"content-type": "application/json"})
    after = metric(httpx.get(f"{url}/metrics").text, "softdimo_requests_total", endpoint="/generate", status="413")
    assert after == before + 1


def _raw(body: bytes, content_type: str | None = "application/json") -> dict:
    return {"content": body, "headers": {"content-type": content_type} if content_type else {}}


BAD_INPUTS = {
    "malformed json": _raw(b'{"prompt": "a red circle",'),
    "not utf-8": _raw(b'{"prompt": "\xff\xfe"}'),
    "empty body": _raw(b""),
    "empty body, no content type": _raw(b"", None),
    "json null": _raw(b"null"),
    "json array": _raw(b'["a red circle"]'),
    "json string": _raw(b'"a red circle"'),
    "deeply nested": _raw(b"[" * 400 + b"]" * 400),
    "wrong content type": _raw(b'{"prompt": "a red circle"}', "text/plain"),
    "form body": _raw(b"prompt=a+red+circle", "application/x-www-form-urlencoded"),
    "n as string": _raw(b'{"prompt": "a red circle", "n": "two"}'),
    "n as float": _raw(b'{"prompt": "a red circle", "n": 1.5}'),
    "n infinite": _raw(b'{"prompt": "a red circle", "n": 1e400}'),
    "n not a number": _raw(b'{"prompt": "a red circle", "n": NaN}'),
    "seed minus infinity": _raw(b'{"prompt": "a red circle", "seed": -Infinity}'),
    "seed of 500 digits": _raw(b'{"prompt": "a red circle", "seed": ' + b"9" * 500 + b"}"),
    "seed of 5000 digits": _raw(b'{"prompt": "a red circle", "seed": ' + b"9" * 1000 + b"}"),
    "huge class label": _raw(b'{"class_label": 99999999999999999999999}'),
    "prompt as list": _raw(b'{"prompt": ["a", "red", "circle"]}'),
    "prompt as object": _raw(b'{"prompt": {"text": "a red circle"}}'),
    "lone surrogate": _raw(b'{"prompt": "\\ud800 red circle"}'),
    "surrogate in a rejected field": _raw(b'{"prompt": "a red circle", "n": "\\udfff"}'),
    "unicode words": _raw('{"prompt": "un cercle rouge \u00e9\u4e2d\U0001f600"}'.encode()),
    "control characters": _raw(b'{"prompt": "a red\\u0000circle\\n"}'),
    "too many words": _raw(json.dumps({"prompt": " ".join(["a red circle and a blue square"] * 5)}).encode()),
    "prompt over 512 characters": _raw(json.dumps({"prompt": "red " * 200}).encode()),
    "unknown model with surrogate": _raw(b'{"prompt": "a red circle", "model": "\\ud83d"}'),
    "null fields": _raw(b'{"prompt": null, "class_label": null}'),
    "duplicate keys": _raw(b'{"prompt": "a red circle", "prompt": 7}'),
}


@pytest.mark.parametrize("path", ["/generate", "/refine", "/v1/images/generations"])
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_a_clear_4xx_never_a_5xx(url, path, case):
    r = httpx.post(f"{url}{path}", **BAD_INPUTS[case])
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert error_message(r)
