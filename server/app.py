"""The FastAPI application: create_app(settings, engine) and its lifespan (load, warm up, serve, drain), and serve()."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server import openapi
from server.engine import Engine, verify_bundles
from server.errors import error_response
from server.guard import ApiKeyGuard, BodyLimit, BodyTooLarge
from server.job_runner import JobRunner
from server.metrics import Metrics
from server.routes import router
from server.service import ENDPOINTS, MODEL_THREAD, Service, ServiceError
from server.settings import Settings
from server.timeline import RequestTimer

log = logging.getLogger("softdimo.server")

# After the batchers have drained, how long answers may take to be encoded and written before connections close.
_RESPONSE_GRACE_S = 10.0


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """An app serving `engine`, or the bundles named in `settings` loaded in the background at start-up.

    Liveness answers at once; readiness waits for loading and warm-up at the maximum batch size."""
    metrics = Metrics()
    service = Service(settings, metrics, start_jobs=JobRunner.start)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        startup = asyncio.create_task(service.start(engine))
        startup.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are reported on /readyz
        try:
            yield
        finally:
            if not startup.done():
                startup.cancel()
            await service.stop()

    app = FastAPI(
        title="softdimo",
        summary="One-step discrete image generation, with test-time embedding optimisation.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    app.include_router(router)

    def count_refusal(path: str, status: int) -> None:
        if path in ENDPOINTS:
            metrics.requests.labels(path, "unknown", str(status)).inc()

    # Added innermost first: the key is checked before a byte of the body is read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(
            ApiKeyGuard,
            api_key=settings.api_key,
            exempt=settings.auth_exempt_paths,
            on_refused=lambda path: count_refusal(path, 401),
        )
    app.add_middleware(RequestTimer)  # outermost: a request's time counts from its arrival, before any check

    def served() -> openapi.Served | None:
        engine = service.engine
        return None if engine is None else (list(engine.models.values()), engine.default_model)

    openapi.install(app, settings=settings, models=served)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return error_response(request.url.path, exc.status, exc.detail, exc.headers, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        count_refusal(request.url.path, 422)
        return error_response(request.url.path, 422, jsonable_encoder(exc.errors()))

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge):
        count_refusal(request.url.path, 413)
        return error_response(request.url.path, 413, exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(
        request: Request, exc: StarletteHTTPException
    ):  # unknown paths, wrong methods, unreadable bodies
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404 and exc.detail == "Not Found":  # no route, as opposed to a route answering 404
            detail = f"no endpoint {request.method} {request.url.path}; see /openapi.json for the endpoints"
            return error_response(request.url.path, 404, detail, headers, code="unknown_url")
        if exc.status_code == 405:
            # Every route of the path, not just the first that matched it: GET and DELETE /v1/jobs/{id} are two routes.
            allowed = sorted(
                {
                    method
                    for route in _leaf_routes(app.routes)
                    if route.matches(request.scope)[0] is Match.PARTIAL
                    for method in getattr(route, "methods", None) or ()
                }
            )
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
            return error_response(request.url.path, 405, detail, {**(headers or {}), "Allow": ", ".join(allowed)})
        return error_response(request.url.path, exc.status_code, exc.detail, headers)

    return app


def _leaf_routes(routes) -> list:
    """The routes of an app with included routers opened up (FastAPI keeps an included router as one entry)."""
    leaves = []
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None) or getattr(route, "routes", None)
        leaves.extend(_leaf_routes(inner) if inner is not None else [route])
    return leaves


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM and SIGINT turned into a drain.

    uvicorn's own handler closes the listening socket at once, so probes would never see /readyz turn 503,
    and it raises the signal again after shutdown, so the process would not exit 0. Here the first signal marks
    the service draining (new work gets 503, /readyz 503) while the listener stays open, waits up to
    drain_timeout_s for queued and running batches, then lets uvicorn shut down. A second signal stops at once."""

    def __init__(self, app: FastAPI, settings: Settings):
        super().__init__(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                timeout_graceful_shutdown=_RESPONSE_GRACE_S,
            )
        )
        self.service: Service = app.state.service
        self.forced = False
        self._drain_task: asyncio.Task | None = None
        self._abort_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._drain_task is None:
            log.info(
                "%s: draining; new work gets 503, queued work has %gs to finish",
                name,
                self.service.settings.drain_timeout_s,
            )
            self._drain_task = asyncio.create_task(self._drain_then_exit())
            return
        log.warning("%s again: stopping now; queued work gets 503", name)
        self.forced = True
        self.should_exit = self.force_exit = (
            True  # uvicorn then neither waits for connections nor runs the lifespan's end
        )
        self._abort_task = asyncio.create_task(self.service.abort())

    async def _drain_then_exit(self) -> None:
        began = time.monotonic()
        try:
            await self.service.stop()
        finally:
            log.info("drained in %.1fs; closing connections", time.monotonic() - began)
            self.should_exit = True


def _model_threads_done(timeout_s: float) -> bool:
    """Wait briefly for the model thread to end; False if a batch is still running on it (after a drain timeout)."""
    deadline = time.monotonic() + timeout_s
    threads = [t for t in threading.enumerate() if t.name.startswith(MODEL_THREAD)]
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)


def serve(settings: Settings) -> None:
    """Run the server in this process until SIGTERM or SIGINT, which drain it first; exits 0 after a drain.

    The bundles are verified before anything listens, so a missing or altered file stops start-up with BundleError."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    verify_bundles(settings.weights)
    server = DrainingServer(create_app(settings), settings)
    server.run()
    if server.forced or not _model_threads_done(timeout_s=2.0):
        # A batch still runs on the model thread, which the interpreter would wait for at exit: leave now.
        log.warning("leaving with a batch still running")
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1 if server.forced else 0)
