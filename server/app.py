"""The FastAPI application: create_app(settings, engine) and its lifespan (load, warm up, serve, drain)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.engine import Engine
from server.metrics import Metrics
from server.routes import router
from server.service import ENDPOINTS, Service, ServiceError
from server.settings import Settings

log = logging.getLogger("softdimo.server")


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """An app serving `engine`, or the bundles named in `settings` loaded in the background at start-up.

    Liveness answers at once; readiness waits for loading and warm-up at the maximum batch size."""
    metrics = Metrics()
    service = Service(settings, metrics)

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

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        if request.url.path in ENDPOINTS:
            metrics.requests.labels(request.url.path, "unknown", "422").inc()
        return await request_validation_exception_handler(request, exc)

    return app


def serve(settings: Settings) -> None:
    """Run the server in this process until SIGINT or SIGTERM."""
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
