"""Thin HTTP endpoints: parse, hand to the service, shape the answer, count it."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from server.schemas import (
    ErrorResponse,
    GenerateRequest,
    ImageData,
    ImageResponse,
    ModelList,
    OpenAIErrorResponse,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImageResponse,
    RefineRequest,
    Status,
    Timing,
    ValidationErrorResponse,
)
from server.engine import ServedModel
from server.jobs import RefineJob, RefineProgress
from server.service import GENERATE, OPENAI, REFINE, GeneratedImages, Service, ServiceError
from softdimo.images import MEDIA_TYPES

router = APIRouter()
IMAGE_MEDIA = {v: k for k, v in MEDIA_TYPES.items()}
AUTH_RESPONSES = {401: {"model": ErrorResponse, "description": "an API key is configured and the request lacks it or has a wrong one"}}
ERROR_RESPONSES = {
    **AUTH_RESPONSES,
    400: {"model": ErrorResponse, "description": "the body could not be read (e.g. a number of more than 4300 digits)"},
    404: {"model": ErrorResponse, "description": "unknown model or reward"},
    413: {"model": ErrorResponse, "description": "the body is larger than max_body_bytes"},
    422: {"model": ValidationErrorResponse, "description": "malformed, out of bounds, or more than max_request_cost"},
    429: {"model": ErrorResponse, "description": "the queue is full (max_queue or max_queue_cost); see Retry-After"},
    500: {"model": ErrorResponse, "description": "the batch this request was in failed on the device"},
    503: {"model": ErrorResponse, "description": "not ready yet, or draining for shutdown; see Retry-After"},
    504: {"model": ErrorResponse, "description": "the deadline passed before the request could be served"},
}
# The same statuses under /v1/, each answered with an OpenAI error object.
OPENAI_ERROR_RESPONSES = {status: {**answer, "model": OpenAIErrorResponse} for status, answer in ERROR_RESPONSES.items()}
IMAGE_RESPONSES = {
    **ERROR_RESPONSES,
    200: {"content": {media: {} for media in MEDIA_TYPES.values()}, "description": "JSON, or with Accept: image/... and n = 1 the image"},
    406: {"model": ErrorResponse, "description": "an image body was asked for with n > 1"},
}
REFINE_RESPONSES = {
    **IMAGE_RESPONSES,
    200: {
        "content": {**IMAGE_RESPONSES[200]["content"], "text/event-stream": {}},
        "description": "JSON; with Accept: image/... and n = 1 the image; with stream, server-sent events",
    },
}


def _service(request: Request) -> Service:
    return request.app.state.service


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away; the body has been read, so the next message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work):
    """Run `work` but cancel it if the client disconnects first, so its images are never computed."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ServiceError(499, "client closed the request")
    return task.result()


def _model_label(service: Service, name: str | None) -> str:
    """The `model` label: a loaded model's name; anything else folds into one value to bound cardinality."""
    if service.engine is None:
        return "none"
    name = service.engine.default_model if name is None else name
    return name if name in service.engine.models else "unknown"


@asynccontextmanager
async def _counted(service: Service, endpoint: str, model_name: str | None, count_success: bool = True):
    """In-flight gauge, duration histogram and per-status counter around one request. With count_success
    False only a refusal is counted: a stream's checks pass and it is counted once its events end."""
    metrics = service.metrics
    model = _model_label(service, model_name)
    metrics.inflight.labels(endpoint).inc()
    began = time.perf_counter()
    status = "500"
    try:
        yield
        status = "200"
    except ServiceError as exc:
        status = str(exc.status)
        raise
    except asyncio.CancelledError:  # the client went away
        status = "499"
        raise
    finally:
        metrics.inflight.labels(endpoint).dec()
        if status != "200" or count_success:
            metrics.requests.labels(endpoint, model, status).inc()
            metrics.request_duration.labels(endpoint, model).observe(time.perf_counter() - began)


def _wanted_image_format(request: Request, body_format: str) -> str | None:
    """The image format an `Accept: image/...` header asks for, or None when JSON is wanted."""
    accept = [part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")]
    for media in accept:
        if media in IMAGE_MEDIA:
            return IMAGE_MEDIA[media]
        if media == "image/*":
            return body_format
    return None


def _image_body_format(request: Request, body: GenerateRequest | RefineRequest) -> str | None:
    """The image format an `Accept: image/...` header asks for (None: JSON); 406 when it would hold several images."""
    image_format = _wanted_image_format(request, body.format)
    if image_format is not None and body.n != 1:
        raise ServiceError(406, "an image body holds one image: use n = 1, or Accept: application/json")
    return image_format


async def _encoded(service: Service, endpoint: str, result: GeneratedImages, image_format: str) -> list[bytes]:
    """The images in `image_format`, counted as served."""
    encoded = await service.encode(result.images, image_format)
    service.metrics.images.labels(endpoint, result.model).inc(len(encoded))
    return encoded


def _timing(result: GeneratedImages, began: float) -> Timing:
    return Timing(queue_s=round(result.queue_s, 6), compute_s=round(result.compute_s, 6), total_s=round(time.perf_counter() - began, 6))


async def _generate(request: Request, body: GenerateRequest, endpoint: str) -> GeneratedImages:
    service = _service(request)
    model = service.model(body.model, endpoint=endpoint)
    condition = service.condition(model, body.prompt, body.class_label)
    seed = service.first_seed(body.seed)
    return await _unless_disconnected(
        request, service.generate(model=model, condition=condition, seed=seed, n=body.n, steps=body.steps)
    )


@router.post("/generate", response_model=ImageResponse, responses=IMAGE_RESPONSES)
async def generate(request: Request, body: GenerateRequest):
    service = _service(request)
    began = time.perf_counter()
    async with _counted(service, GENERATE, body.model):
        image_format = _image_body_format(request, body)
        result = await _generate(request, body, GENERATE)
        encoded = await _encoded(service, GENERATE, result, image_format or body.format)
        if image_format is not None:
            return Response(encoded[0], media_type=MEDIA_TYPES[image_format], headers={"X-Seed": str(result.seeds[0])})
        return ImageResponse(
            id=service.new_id("gen"), model=result.model, created=int(time.time()),
            data=[ImageData(b64_json=service.b64(data), seed=seed) for data, seed in zip(encoded, result.seeds)],
            timing=_timing(result, began),
        )  # fmt: skip


@router.post("/refine", response_model=ImageResponse, responses=REFINE_RESPONSES)
async def refine(request: Request, body: RefineRequest):
    """TTEO: gradient steps on the generator's input embeddings against a reward, then decode.

    Requests batch together when their steps, lr, best_of and reward agree; others wait in arrival order
    for a batch of their own. With best_of = 1 and the same seed, the starting image is /generate's.
    With `stream`, the answer is a text/event-stream of each step's rewards, then the same JSON."""
    service = _service(request)
    began = time.perf_counter()
    if body.stream:  # checked here, so a refused request is an ordinary JSON error before any event
        async with _counted(service, REFINE, body.model, count_success=False):
            if _wanted_image_format(request, body.format) is not None:
                raise ServiceError(406, "a stream carries JSON events: use Accept: text/event-stream or application/json")
            progress = RefineProgress(loop=asyncio.get_running_loop(), queue=asyncio.Queue())
            model, job = _refine_job(service, body, progress)
        events = _refine_events(service, model, job, body, began)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async with _counted(service, REFINE, body.model):
        image_format = _image_body_format(request, body)
        model, job = _refine_job(service, body)
        result = await _unless_disconnected(request, service.refine(model=model, job=job))
        encoded = await _encoded(service, REFINE, result, image_format or body.format)
        if image_format is not None:
            item = result.refined[0]
            headers = {"X-Seed": str(result.seeds[0]), "X-Reward-Before": f"{item.reward_before:.6f}", "X-Reward-After": f"{item.reward_after:.6f}"}
            return Response(encoded[0], media_type=MEDIA_TYPES[image_format], headers=headers)
        return _refine_response(service, result, encoded, began)


def _refine_job(service: Service, body: RefineRequest, progress: RefineProgress | None = None) -> tuple[ServedModel, RefineJob]:
    model = service.model(body.model, endpoint=REFINE)
    condition = service.condition(model, body.prompt, body.class_label)
    text, seed = model.reward_text(body.prompt, body.class_label), service.first_seed(body.seed)
    job = service.refine_job(
        model=model, condition=condition, text=text, seed=seed, n=body.n, steps=body.steps, lr=body.lr,
        best_of=body.best_of, reward=body.reward, progress=progress,
    )
    return model, job


def _refine_response(service: Service, result: GeneratedImages, encoded: list[bytes], began: float) -> ImageResponse:
    return ImageResponse(
        id=service.new_id("ref"), model=result.model, created=int(time.time()),
        data=[
            ImageData(b64_json=service.b64(data), seed=seed, reward_before=round(item.reward_before, 6),
                      reward_after=round(item.reward_after, 6), candidate_seed=item.candidate_seed)
            for data, seed, item in zip(encoded, result.seeds, result.refined)
        ],
        timing=_timing(result, began),
    )  # fmt: skip


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _refine_events(service: Service, model: ServedModel, job: RefineJob, body: RefineRequest, began: float):
    """A streaming /refine: `step` events while TTEO runs, then `result` (or `error`). When the client goes
    away, the generator is cancelled: its images stop at the next step and its queued parts are dropped."""
    progress = job.progress
    work = asyncio.ensure_future(service.refine(model=model, job=job))
    try:
        async with _counted(service, REFINE, body.model):
            while not work.done() or not progress.queue.empty():
                report = asyncio.ensure_future(progress.queue.get())
                await asyncio.wait({work, report}, return_when=asyncio.FIRST_COMPLETED)
                if not report.done():
                    report.cancel()
                    continue
                step, seeds, rewards = report.result()
                yield _event("step", {"step": step, "images": [{"seed": s, "reward": round(r, 6)} for s, r in zip(seeds, rewards)]})
            result = work.result()
            encoded = await _encoded(service, REFINE, result, body.format)
            yield _event("result", _refine_response(service, result, encoded, began).model_dump(mode="json"))
    except ServiceError as exc:
        yield _event("error", {"status": exc.status, "detail": exc.detail})
    finally:
        progress.cancelled.set()
        work.cancel()


@router.post("/v1/images/generations", response_model=OpenAIImageResponse, responses=OPENAI_ERROR_RESPONSES)
async def openai_generations(request: Request, body: OpenAIImageRequest):
    service = _service(request)
    async with _counted(service, OPENAI, body.model):
        model = service.model(body.model, endpoint=OPENAI)
        side = f"{model.image_size}x{model.image_size}"
        if body.size not in (None, "auto", side):
            raise ServiceError(422, f"size {body.size!r} is not available: model {model.name!r} draws {side}")
        request_body = GenerateRequest(prompt=body.prompt, n=body.n, seed=body.seed, model=body.model, format=body.output_format)
        result = await _generate(request, request_body, OPENAI)
        encoded = await _encoded(service, OPENAI, result, body.output_format)
        return OpenAIImageResponse(created=int(time.time()), data=[OpenAIImage(b64_json=service.b64(d)) for d in encoded])


@router.get("/v1/models", response_model=ModelList, responses={401: OPENAI_ERROR_RESPONSES[401]})
async def models(request: Request):
    service = _service(request)
    if service.engine is None:
        return ModelList(data=[])
    return ModelList(data=[m.card() for m in service.engine.models.values()])


PLAYGROUND = Path(__file__).parent / "playground" / "index.html"


@router.get("/", include_in_schema=False)
async def playground(request: Request):
    """The browser playground: one static page, nothing fetched from elsewhere."""
    if not request.app.state.settings.playground:
        raise ServiceError(404, "the playground is off (--no-playground)")
    return FileResponse(PLAYGROUND, media_type="text/html")


@router.get("/healthz", response_model=Status)
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", response_model=Status, responses={503: {"model": Status, "description": "loading, draining or failed"}})
async def readyz(request: Request):
    service = _service(request)
    if service.ready:
        return {"status": "ready"}
    reason = "draining" if service.draining else ("failed: " + service.load_error if service.load_error else "loading")
    return JSONResponse({"status": reason}, status_code=503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    from server.metrics import CONTENT_TYPE

    return Response(_service(request).metrics.exposition(), media_type=CONTENT_TYPE)
