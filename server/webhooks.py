"""Webhook calls for finished jobs: target checks against SSRF, Standard Webhooks signatures, retries off the worker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from urllib.parse import urlsplit

import httpx

from server.metrics import Metrics

log = logging.getLogger("softdimo.webhooks")


class WebhookRefused(ValueError):
    """A webhook URL this server will not call; the message says why."""


def check_target(url: str, *, allow_private: bool) -> None:
    """Refuse a URL whose host is, or resolves to, a loopback, private, link-local or otherwise non-public address
    (unless `allow_private`): a job must not make this server call its own network. Blocks on DNS."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"webhook {url!r} is not an http(s) URL with a host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(
            parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookRefused(f"webhook host {parts.hostname!r} does not resolve: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise WebhookRefused(
                f"webhook host {parts.hostname!r} is {address}, a non-public address; the server refuses those "
                "unless started with --webhook-allow-private"
            )


def _key(secret: str) -> bytes:
    """Standard Webhooks secrets are `whsec_` + base64; any other string is used as it is."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def signature_headers(*, secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers: the signature is base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`, so a receiver
    checks both that the body is ours and that it is fresh (and a replayed id can be dropped)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": f"v1,{digest}"}


class WebhookSender:
    """Delivers webhook calls in tasks of their own: a slow or failing receiver never holds up a job.

    Each call is tried up to `attempts` times, waiting `backoff_s`, then twice that, and so on, between tries;
    any answer but 2xx, a timeout or a connection failure counts as a failed try. Redirects are not followed."""

    def __init__(
        self,
        *,
        secret: str | None,
        attempts: int,
        backoff_s: float,
        timeout_s: float,
        allow_private: bool,
        metrics: Metrics,
    ):
        self.secret, self.attempts, self.backoff_s, self.allow_private = secret, attempts, backoff_s, allow_private
        self.metrics = metrics
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False)
        self._tasks: set[asyncio.Task] = set()

    def send(self, url: str, *, message_id: str, payload: dict) -> None:
        task = asyncio.create_task(self._deliver(url, message_id, payload), name=f"webhook-{message_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, message_id: str, payload: dict) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        for attempt in range(1, self.attempts + 1):
            try:
                # Checked again at each call: the name may resolve elsewhere now than when the job was accepted.
                await asyncio.to_thread(check_target, url, allow_private=self.allow_private)
                headers = {"content-type": "application/json"}
                if self.secret is not None:
                    headers |= signature_headers(
                        secret=self.secret, message_id=message_id, timestamp=int(time.time()), body=body
                    )
                response = await self._client.post(url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    self.metrics.webhook_deliveries.labels("delivered").inc()
                    return
                reason = f"status {response.status_code}"
            except (httpx.HTTPError, WebhookRefused) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt == self.attempts:
                break
            self.metrics.webhook_deliveries.labels("retried").inc()
            log.info("webhook %s for %s failed (%s); retrying", url, message_id, reason)
            await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        self.metrics.webhook_deliveries.labels("abandoned").inc()
        log.warning("webhook %s for %s abandoned after %d tries: %s", url, message_id, self.attempts, reason)

    async def close(self, *, grace_s: float) -> None:
        """Let deliveries in progress finish for up to `grace_s`, then drop the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d webhook deliveries dropped at shutdown", len(pending))
        await self._client.aclose()
