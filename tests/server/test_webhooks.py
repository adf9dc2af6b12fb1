"""Webhooks, against a real local receiver: the finished job arrives signed (Standard Webhooks), a failing receiver
is retried with backoff, and private or loopback targets are refused at submit unless the server allows them."""

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import error_message, metric
from benchmarks.running import HOST, server_thread

from server.settings import Settings
from server.webhooks import WebhookRefused, check_target, signature_headers

SECRET = "whsec_" + base64.b64encode(b"a secret of the tests").decode()
PROMPT = "a red circle"


class Receiver:
    """An HTTP server that records each POST and answers 500 to the first `failures` of them."""

    def __init__(self, failures: int):
        self.calls: list[tuple[dict, bytes, float]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                self.send_response(500 if len(receiver.calls) <= failures else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def verify(headers: dict, body: bytes) -> bool:
    """What a receiver does (Standard Webhooks): recompute the signature over id, timestamp and body."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(f"v1,{expected}", part) for part in headers["webhook-signature"].split())


@pytest.fixture(scope="module")
def url(tiny_bundles, tmp_path_factory):
    settings = Settings(
        weights=[str(tiny_bundles["one-step"])],
        device="cpu",
        max_batch_size=4,
        webhook_secret=SECRET,
        webhook_allow_private=True,
        webhook_backoff_s=0.2,
        webhook_attempts=3,
        job_db_path=str(tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"),
    )
    with server_thread(settings) as base:
        yield base


def test_a_finished_job_is_posted_signed_and_retried_until_the_receiver_takes_it(url):
    receiver = Receiver(failures=2)
    try:
        body = {"endpoint": "refine", "prompt": PROMPT, "seed": 3, "steps": 2, "webhook": receiver.url}
        job_id = httpx.post(f"{url}/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 60
        while len(receiver.calls) < 3:
            assert time.monotonic() < deadline, receiver.calls
            time.sleep(0.05)
        time.sleep(0.5)
        assert len(receiver.calls) == 3  # delivered on the third try, then no more
        (headers, sent, first), (_, _, second), (_, _, third) = receiver.calls
        assert all(verify(h, b) for h, b, _ in receiver.calls) and headers["webhook-id"] == job_id
        assert not verify(headers, sent.replace(b"succeeded", b"failed"))
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        assert second - first >= 0.2 and third - second >= 0.4  # backoff doubles
        delivered = json.loads(sent)
        assert delivered == httpx.get(f"{url}/v1/jobs/{job_id}").json() and delivered["status"] == "succeeded"
        assert metric(httpx.get(f"{url}/metrics").text, "softdimo_webhook_deliveries_total", outcome="retried") >= 2
    finally:
        receiver.close()


def test_a_slow_receiver_never_holds_up_the_next_job(url):
    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):
            time.sleep(3)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((HOST, 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook = f"http://{HOST}:{server.server_address[1]}/"
        first = httpx.post(f"{url}/v1/jobs", json={"endpoint": "generate", "prompt": PROMPT, "webhook": hook}).json()[
            "id"
        ]
        began = time.monotonic()
        second = httpx.post(f"{url}/v1/jobs", json={"endpoint": "generate", "prompt": PROMPT}).json()["id"]
        while httpx.get(f"{url}/v1/jobs/{second}").json()["status"] != "succeeded":
            assert time.monotonic() - began < 2.5, "the second job waited for the first one's webhook"
            time.sleep(0.02)
        assert httpx.get(f"{url}/v1/jobs/{first}").json()["status"] == "succeeded"
    finally:
        server.shutdown()


def test_private_targets_are_refused_unless_allowed():
    for target in (
        "http://127.0.0.1:9/x",
        "http://10.0.0.7/x",
        "http://[::1]/x",
        "http://169.254.169.254/latest",
        "http://localhost/x",
    ):
        with pytest.raises(WebhookRefused, match="non-public"):
            check_target(target, allow_private=False)
        check_target(target, allow_private=True)
    check_target("http://93.184.215.14/hook", allow_private=False)  # a public address literal: no DNS needed


def test_submit_refuses_a_loopback_webhook_or_one_that_cannot_be_signed(tiny_bundles, tmp_path):
    weights = [str(tiny_bundles["one-step"])]
    body = {"endpoint": "generate", "prompt": PROMPT, "webhook": "http://127.0.0.1:9/hook"}
    strict = Settings(
        weights=weights, device="cpu", max_batch_size=2, webhook_secret=SECRET, job_db_path=str(tmp_path / "a")
    )
    with server_thread(strict) as url:
        refused = httpx.post(f"{url}/v1/jobs", json=body)
        assert refused.status_code == 422 and "non-public" in error_message(refused)
    unsigned = Settings(
        weights=weights, device="cpu", max_batch_size=2, webhook_allow_private=True, job_db_path=str(tmp_path / "b")
    )
    with server_thread(unsigned) as url:
        refused = httpx.post(f"{url}/v1/jobs", json=body)
        assert refused.status_code == 422 and "WEBHOOK_SECRET" in error_message(refused)


def test_signature_matches_the_standard_webhooks_reference_vector():
    # From the Standard Webhooks specification's example (svix): this secret, id, timestamp and body sign to this value.
    headers = signature_headers(
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        message_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        timestamp=1614265330,
        body=b'{"test": 2432232314}',
    )
    assert headers["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
