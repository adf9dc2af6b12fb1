"""Thin HTTP endpoints: parse, hand to the service, shape the answer, count it."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from server import uploads
from server.schemas import (
    EditRequest,
    ErrorResponse,
    GenerateRequest,
    ImageResponse,
    JobAccepted,
    JobRequest,
    JobResponse,
    ModelList,
    OpenAIEditRequest,
    OpenAIErrorResponse,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImageResponse,
    RefineRequest,
    Status,
    ValidationErrorResponse,
)
from server.engine import ServedModel
from server.job_runner import JOBS_PATH, JobRunner, job_response
from server.job_store import FINISHED, JobRecord
from server.jobs import EditRefineJob, RefineJob, RefineProgress
from server.service import EDIT, GENERATE, OPENAI, OPENAI_EDITS, REFINE, GeneratedImages, Service, ServiceError
from server.timeline import RequestTimeline
from server.work import edit_job, encoded, generate_job, generate_response, refine_job, refine_response
from softdimo.images import MEDIA_TYPES

router = APIRouter()
IMAGE_MEDIA = {v: k for k, v in MEDIA_TYPES.items()}
AUTH_RESPONSES = {
    401: {"model": ErrorResponse, "description": "an API key is configured and the request lacks it or has a wrong one"}
}
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
OPENAI_ERROR_RESPONSES = {
    status: {**answer, "model": OpenAIErrorResponse} for status, answer in ERROR_RESPONSES.items()
}
IMAGE_RESPONSES = {
    **ERROR_RESPONSES,
    202: {"model": JobAccepted, "description": "with `Prefer: respond-async`: accepted as a job (see Location)"},
    200: {
        "content": {media: {} for media in MEDIA_TYPES.values()},
        "description": "JSON, or with Accept: image/... and n = 1 the image",
    },
    406: {"model": ErrorResponse, "description": "an image body was asked for with n > 1"},
}
REFINE_RESPONSES = {
    **IMAGE_RESPONSES,
    200: {
        "content": {**IMAGE_RESPONSES[200]["content"], "text/event-stream": {}},
        "description": "JSON; with Accept: image/... and n = 1 the image; with stream, server-sent events",
    },
}
EDIT_RESPONSES = {status: answer for status, answer in REFINE_RESPONSES.items() if status != 202}  # no jobs


def _service(request: Request) -> Service:
    return request.app.state.service


def _job_runner(request: Request) -> JobRunner:
    service = _service(request)
    if service.jobs is None:
        raise ServiceError(503, "the server is not ready yet: models are loading", {"Retry-After": "5"})
    return service.jobs


def _prefers_async(request: Request) -> bool:
    """RFC 7240 `Prefer: respond-async`: answer 202 with a job instead of waiting for the images."""
    parts = [part for header in request.headers.getlist("prefer") for part in header.replace(";", ",").split(",")]
    return "respond-async" in [part.split("=")[0].strip().lower() for part in parts]


def _accepted(job: JobRecord, *, preference_applied: bool = False) -> JSONResponse:
    headers = {"Location": f"{JOBS_PATH}/{job.id}"}
    if preference_applied:
        headers["Preference-Applied"] = "respond-async"
    body = JobAccepted(id=job.id, status=job.status, created=int(job.created)).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers=headers)


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


def _check_stream_accepted(request: Request, body: RefineRequest | EditRequest) -> None:
    """406 for a stream asked for with `Accept: image/...`: its events are JSON."""
    if _wanted_image_format(request, body.format) is not None:
        raise ServiceError(406, "a stream carries JSON events: use Accept: text/event-stream or application/json")


def _image_body_format(request: Request, body: GenerateRequest | RefineRequest | EditRequest) -> str | None:
    """The image format an `Accept: image/...` header asks for (None: JSON); 406 when it would hold several images."""
    image_format = _wanted_image_format(request, body.format)
    if image_format is not None and body.n != 1:
        raise ServiceError(406, "an image body holds one image: use n = 1, or Accept: application/json")
    return image_format


async def _generate(
    request: Request, body: GenerateRequest, endpoint: str, timeline: RequestTimeline
) -> GeneratedImages:
    service = _service(request)
    model = service.model(body.model, endpoint=endpoint)
    job = generate_job(service, model, body)
    timeline.queued()
    result = await _unless_disconnected(request, service.generate(model=model, job=job))
    timeline.returned(result.compute_s)
    return result


@router.post("/generate", response_model=ImageResponse, responses=IMAGE_RESPONSES)
async def generate(request: Request, body: GenerateRequest):
    service = _service(request)
    if _prefers_async(request):
        return _accepted(await _job_runner(request).submit(body), preference_applied=True)
    began = time.perf_counter()
    timeline = RequestTimeline.begin(request.scope, service.metrics, GENERATE)
    async with _counted(service, GENERATE, body.model):
        image_format = _image_body_format(request, body)
        result = await _generate(request, body, GENERATE, timeline)
        images = await encoded(service, GENERATE, result, image_format or body.format)
        timeline.encoded()
        if image_format is not None:
            return Response(images[0], media_type=MEDIA_TYPES[image_format], headers=_image_headers(result))
        return generate_response(service, result, images, began)


@router.post("/refine", response_model=ImageResponse, responses=REFINE_RESPONSES)
async def refine(request: Request, body: RefineRequest):
    """TTEO: gradient steps on the generator's input embeddings against a reward, then decode.

    Requests batch together when their steps, lr, best_of and reward agree; others wait in arrival order
    for a batch of their own. With best_of = 1 and the same seed, the starting image is /generate's.
    With `stream`, the answer is a text/event-stream of each step's rewards, then the same JSON."""
    service = _service(request)
    if _prefers_async(request):
        return _accepted(await _job_runner(request).submit(body), preference_applied=True)
    began = time.perf_counter()
    if body.stream:  # checked here, so a refused request is an ordinary JSON error before any event
        async with _counted(service, REFINE, body.model, count_success=False):
            _check_stream_accepted(request, body)
            progress = RefineProgress(loop=asyncio.get_running_loop(), queue=asyncio.Queue())
            model = service.model(body.model, endpoint=REFINE)
            job = refine_job(service, model, body, progress)
        events = _refine_events(service, model, job, body, began)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    timeline = RequestTimeline.begin(request.scope, service.metrics, REFINE)
    async with _counted(service, REFINE, body.model):
        image_format = _image_body_format(request, body)
        model = service.model(body.model, endpoint=REFINE)
        job = refine_job(service, model, body)
        timeline.queued()
        result = await _unless_disconnected(request, service.refine(model=model, job=job))
        timeline.returned(result.compute_s)
        images = await encoded(service, REFINE, result, image_format or body.format)
        timeline.encoded()
        if image_format is not None:
            return Response(images[0], media_type=MEDIA_TYPES[image_format], headers=_image_headers(result))
        return refine_response(service, result, images, began)


def _image_headers(result: GeneratedImages) -> dict[str, str]:
    """What an image body carries beside the image: its seed, and where refined its rewards."""
    headers = {"X-Seed": str(result.seeds[0])}
    if result.refined is not None:
        item = result.refined[0]
        headers |= {"X-Reward-Before": f"{item.reward_before:.6f}", "X-Reward-After": f"{item.reward_after:.6f}"}
    return headers


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _refine_events(
    service: Service,
    model: ServedModel,
    job: RefineJob | EditRefineJob,
    body: RefineRequest | EditRequest,
    began: float,
    *,
    endpoint: str = REFINE,
    id_prefix: str = "ref",
):
    """A streaming /refine (or /edit with `refine`): `step` events while TTEO runs, then `result` (or `error`). When
    the client goes away, the generator is cancelled: its images stop at the next step and its queued parts are
    dropped."""
    progress = job.progress
    work = asyncio.ensure_future(service.refine(model=model, job=job))
    try:
        async with _counted(service, endpoint, body.model):
            while not work.done() or not progress.queue.empty():
                report = asyncio.ensure_future(progress.queue.get())
                await asyncio.wait({work, report}, return_when=asyncio.FIRST_COMPLETED)
                if not report.done():
                    report.cancel()
                    continue
                step, seeds, rewards = report.result()
                yield _event(
                    "step",
                    {"step": step, "images": [{"seed": s, "reward": round(r, 6)} for s, r in zip(seeds, rewards)]},
                )
            result = work.result()
            images = await encoded(service, endpoint, result, body.format)
            answer = refine_response(service, result, images, began, id_prefix=id_prefix)
            yield _event("result", answer.model_dump(mode="json"))
    except ServiceError as exc:
        yield _event("error", {"status": exc.status, "detail": exc.detail})
    finally:
        progress.cancelled.set()
        work.cancel()


@router.post("/v1/images/generations", response_model=OpenAIImageResponse, responses=OPENAI_ERROR_RESPONSES)
async def openai_generations(request: Request, body: OpenAIImageRequest):
    service = _service(request)
    timeline = RequestTimeline.begin(request.scope, service.metrics, OPENAI)
    async with _counted(service, OPENAI, body.model):
        model = service.model(body.model, endpoint=OPENAI)
        _check_openai_size(model, body.size)
        request_body = GenerateRequest(
            prompt=body.prompt, n=body.n, seed=body.seed, model=body.model, format=body.output_format
        )
        result = await _generate(request, request_body, OPENAI, timeline)
        images = await encoded(service, OPENAI, result, body.output_format)
        timeline.encoded()
        data = [OpenAIImage(b64_json=service.b64(d)) for d in images]
        return OpenAIImageResponse(created=int(time.time()), data=data)


@router.post("/edit", response_model=ImageResponse, responses=EDIT_RESPONSES)
async def edit(request: Request, body: EditRequest):
    """Inpainting and image-to-image: the image's tokens are kept except those repainted (every token whose patch
    the mask's white pixels touch; without a mask, a `strength` share chosen by each image's seed), which the model
    fills in: a one-step model in one forward pass, a teacher in its steps. Pixels farther than one patch from a
    repainted token are the input's. A diffusers MUSE teacher edits as AmusedInpaintPipeline (mask) and
    AmusedImg2ImgPipeline (strength) do instead, its whole image decoded. Image i uses seed + i. With `refine`, TTEO
    on the edit, batched as /refine is, and each image carries its rewards; with its `stream`, server-sent events
    as /refine's."""
    service = _service(request)
    began = time.perf_counter()
    if body.refine is not None and body.refine.stream:  # checked here, so a refused request is plain JSON
        async with _counted(service, EDIT, body.model, count_success=False):
            _check_stream_accepted(request, body)
            progress = RefineProgress(loop=asyncio.get_running_loop(), queue=asyncio.Queue())
            model = service.model(body.model, endpoint=EDIT)
            job = edit_job(service, model, body, progress)
        events = _refine_events(service, model, job, body, began, endpoint=EDIT, id_prefix="edit")
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async with _counted(service, EDIT, body.model):
        image_format = _image_body_format(request, body)
        model = service.model(body.model, endpoint=EDIT)
        job = edit_job(service, model, body)
        refined = isinstance(job, EditRefineJob)
        work = service.refine(model=model, job=job) if refined else service.edit(model=model, job=job)
        result = await _unless_disconnected(request, work)
        images = await encoded(service, EDIT, result, image_format or body.format)
        if image_format is not None:
            return Response(images[0], media_type=MEDIA_TYPES[image_format], headers=_image_headers(result))
        answer = refine_response if refined else generate_response
        return answer(service, result, images, began, id_prefix="edit")


@router.post("/v1/images/edits", response_model=OpenAIImageResponse, responses=OPENAI_ERROR_RESPONSES)
async def openai_edits(request: Request, form: Annotated[OpenAIEditRequest, Form(media_type="multipart/form-data")]):
    """/edit in the OpenAI Images API's multipart shape."""
    service = _service(request)
    async with _counted(service, OPENAI_EDITS, form.model):
        model = service.model(form.model, endpoint=OPENAI_EDITS)
        _check_openai_size(model, form.size)
        side = model.image_size
        image = uploads.read_image(await form.image.read(), side)
        mask = None if form.mask is None else uploads.read_openai_mask(await form.mask.read(), side)
        condition = service.condition(model, form.prompt, None)
        job = service.edit_job(
            model=model,
            image=image,
            mask=mask,
            strength=None,
            condition=condition,
            seed=service.first_seed(form.seed),
            n=form.n,
            steps=None,
        )
        result = await _unless_disconnected(request, service.edit(model=model, job=job))
        images = await encoded(service, OPENAI_EDITS, result, form.output_format)
        data = [OpenAIImage(b64_json=service.b64(d)) for d in images]
        return OpenAIImageResponse(created=int(time.time()), data=data)


def _check_openai_size(model: ServedModel, size: str | None) -> None:
    """The Images API's `size`: the model's own, or "auto" (or none)."""
    side = f"{model.image_size}x{model.image_size}"
    if size not in (None, "auto", side):
        raise ServiceError(422, f"size {size!r} is not available: model {model.name!r} draws {side}")


JOB_ERROR_RESPONSES = {
    **OPENAI_ERROR_RESPONSES,
    404: {"model": OpenAIErrorResponse, "description": "unknown job (or finished and expired), model or reward"},
    409: {"model": OpenAIErrorResponse, "description": "the job has already finished"},
    429: {"model": OpenAIErrorResponse, "description": "this API key has max_queued_jobs_per_key queued jobs"},
}


@router.post(JOBS_PATH, status_code=202, response_model=JobAccepted, responses=JOB_ERROR_RESPONSES)
async def submit_job(request: Request, body: JobRequest):
    """A /generate or /refine body (plus `endpoint`, and optionally `webhook`) run as a durable job: checked now
    as the synchronous endpoint would check it, stored, run by this or another process sharing the store."""
    return _accepted(await _job_runner(request).submit(body, webhook=body.webhook))


@router.get(JOBS_PATH + "/{job_id}", response_model=JobResponse, responses=JOB_ERROR_RESPONSES)
async def get_job(request: Request, job_id: str):
    return job_response(await _job_runner(request).get(job_id))


@router.delete(JOBS_PATH + "/{job_id}", response_model=JobResponse, responses=JOB_ERROR_RESPONSES)
async def cancel_job(request: Request, job_id: str):
    """Cancel a queued or running job: a running /refine stops at its next TTEO step."""
    return job_response(await _job_runner(request).cancel(job_id))


_EVENTS_POLL_S = 0.2


@router.get(
    JOBS_PATH + "/{job_id}/events", responses={**JOB_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}}
)
async def job_events(request: Request, job_id: str):
    """The job's progress as server-sent events: `status` on each change of status, `progress` on each new TTEO
    report ({step, steps, images}), and last an event named by the final status whose data is the job as GET
    answers it."""
    runner = _job_runner(request)
    job = await runner.get(job_id)  # an unknown id is a plain 404, before any event

    async def events():
        current, status, progress = job, None, None
        while current is not None:  # None: expired while watched
            if current.status != status:
                status = current.status
                yield _event("status", {"status": status})
            if current.progress is not None and current.progress != progress:
                progress = current.progress
                yield _event("progress", progress)
            if current.status in FINISHED:
                yield _event(current.status, job_response(current).model_dump(mode="json"))
                return
            await asyncio.sleep(_EVENTS_POLL_S)
            current = await asyncio.to_thread(runner.store.get, job_id)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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


@router.get(
    "/readyz", response_model=Status, responses={503: {"model": Status, "description": "loading, draining or failed"}}
)
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
