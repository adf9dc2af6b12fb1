"""A synchronous image request's way through the server, from arrival to its answer written, observed by stage into
softdimo_request_stage_seconds: where a slow request spent its time."""

from __future__ import annotations

import time
from collections.abc import MutableMapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import Metrics

ARRIVED_AT = "softdimo.arrived_at"  # scope key: time.perf_counter() when the request reached the app
TIMELINE = "softdimo.timeline"  # scope key: the request's RequestTimeline, when its handler keeps one


class RequestTimer:
    """ASGI middleware: stamps each HTTP request's arrival in its scope and, once the last byte of its answer has been
    handed to the server, ends the timeline its handler kept, if any."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[ARRIVED_AT] = time.perf_counter()

        async def timed_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                timeline = scope.get(TIMELINE)
                if timeline is not None:
                    timeline.written()

        await self.app(scope, receive, timed_send)


class RequestTimeline:
    """The moments one request passes, and the stages between them:

    parse    arrival to queued: the body read and validated, the model found, the prompt conditioned
    queue    queued to the images back in the handler, less compute: the wait for a batch (what
             softdimo_queue_wait_seconds measures per batch item) and the hop back to the event loop
    compute  its batch on the device (a request larger than a batch: its slowest part's)
    encode   the images to PNG, JPEG or WebP
    write    the answer built (base64, JSON) and handed to the server

    The stages add up to the request's whole time in the app. They are observed once its answer is written; a
    request refused or abandoned on the way is not observed."""

    __slots__ = ("_metrics", "_endpoint", "_arrived", "_queued", "_returned", "_compute_s", "_encoded")

    def __init__(self, metrics: Metrics, endpoint: str, arrived: float):
        self._metrics, self._endpoint, self._arrived = metrics, endpoint, arrived
        self._queued = self._returned = self._compute_s = self._encoded = None

    @classmethod
    def begin(cls, scope: MutableMapping, metrics: Metrics, endpoint: str) -> RequestTimeline:
        """The timeline of the request of `scope`, kept there for RequestTimer to end. Without RequestTimer in front
        of the app, the request counts as arriving now."""
        timeline = cls(metrics, endpoint, scope.get(ARRIVED_AT) or time.perf_counter())
        scope[TIMELINE] = timeline
        return timeline

    def queued(self) -> None:
        self._queued = time.perf_counter()

    def returned(self, compute_s: float) -> None:
        """The images are back in the handler, after `compute_s` on the device."""
        self._returned, self._compute_s = time.perf_counter(), compute_s

    def encoded(self) -> None:
        self._encoded = time.perf_counter()

    def written(self) -> None:
        if self._encoded is None:  # refused, or its images never came: nothing to observe
            return
        stages = {
            "parse": self._queued - self._arrived,
            "queue": self._returned - self._queued - self._compute_s,
            "compute": self._compute_s,
            "encode": self._encoded - self._returned,
            "write": time.perf_counter() - self._encoded,
        }
        for stage, seconds in stages.items():
            self._metrics.request_stage.labels(self._endpoint, stage).observe(seconds)
