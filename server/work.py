"""A request's work from body to answer, shared by the synchronous endpoints and the jobs that run the same bodies."""

from __future__ import annotations

import time

from server import uploads
from server.engine import ServedModel
from server.jobs import EditJob, EditRefineJob, GenerateJob, RefineJob, RefineProgress
from server.schemas import EditRequest, GenerateRequest, ImageData, ImageResponse, RefineRequest, Timing
from server.service import GeneratedImages, Service


def generate_job(service: Service, model: ServedModel, body: GenerateRequest) -> GenerateJob:
    """The checked work of a /generate body for `model`: ServiceError (4xx) for anything the model cannot take."""
    condition = service.condition(model, body.prompt, body.class_label)
    return service.generate_job(
        model=model, condition=condition, seed=service.first_seed(body.seed), n=body.n, steps=body.steps
    )


def edit_job(
    service: Service, model: ServedModel, body: EditRequest, progress: RefineProgress | None = None
) -> EditJob | EditRefineJob:
    """The checked work of an /edit body for `model` (with `refine`, TTEO on it): ServiceError (4xx) for anything
    the model cannot take, an image or mask that is not a PNG of the model's size among them."""
    condition = service.condition(model, body.prompt, body.class_label)
    image = uploads.read_image(uploads.from_base64(body.image, "image"), model.image_size)
    mask = None if body.mask is None else uploads.read_mask(uploads.from_base64(body.mask, "mask"), model.image_size)
    edit = service.edit_job(
        model=model,
        image=image,
        mask=mask,
        strength=body.strength,
        condition=condition,
        seed=service.first_seed(body.seed),
        n=body.n,
        steps=body.steps,
    )
    if body.refine is None:
        return edit
    asked = body.refine
    return service.edit_refine_job(
        model=model,
        edit=edit,
        text=model.reward_text(body.prompt, body.class_label),
        steps=asked.steps,
        lr=asked.lr,
        best_of=asked.best_of,
        reward=asked.reward,
        progress=progress,
    )


def refine_job(
    service: Service, model: ServedModel, body: RefineRequest, progress: RefineProgress | None = None
) -> RefineJob:
    """The checked work of a /refine body for `model`: ServiceError (4xx) for anything the model cannot take."""
    condition = service.condition(model, body.prompt, body.class_label)
    text, seed = model.reward_text(body.prompt, body.class_label), service.first_seed(body.seed)
    return service.refine_job(
        model=model,
        condition=condition,
        text=text,
        seed=seed,
        n=body.n,
        steps=body.steps,
        lr=body.lr,
        best_of=body.best_of,
        reward=body.reward,
        progress=progress,
    )


async def encoded(service: Service, endpoint: str, result: GeneratedImages, image_format: str) -> list[bytes]:
    """The images in `image_format`, counted as served."""
    images = await service.encode(result.images, image_format)
    service.metrics.images.labels(endpoint, result.model).inc(len(images))
    return images


def timing(result: GeneratedImages, began: float) -> Timing:
    return Timing(
        queue_s=round(result.queue_s, 6),
        compute_s=round(result.compute_s, 6),
        total_s=round(time.perf_counter() - began, 6),
    )


def generate_response(
    service: Service, result: GeneratedImages, images: list[bytes], began: float, id_prefix: str = "gen"
) -> ImageResponse:
    """The answer of /generate (and of /edit, whose ids start "edit-")."""
    return ImageResponse(
        id=service.new_id(id_prefix),
        model=result.model,
        created=int(time.time()),
        data=[ImageData(b64_json=service.b64(data), seed=seed) for data, seed in zip(images, result.seeds)],
        timing=timing(result, began),
    )


def refine_response(
    service: Service, result: GeneratedImages, images: list[bytes], began: float, id_prefix: str = "ref"
) -> ImageResponse:
    """The answer of /refine (and of /edit with `refine`, whose ids start "edit-")."""
    return ImageResponse(
        id=service.new_id(id_prefix),
        model=result.model,
        created=int(time.time()),
        data=[
            ImageData(
                b64_json=service.b64(data),
                seed=seed,
                reward_before=round(item.reward_before, 6),
                reward_after=round(item.reward_after, 6),
                candidate_seed=item.candidate_seed,
            )
            for data, seed, item in zip(images, result.seeds, result.refined)
        ],
        timing=timing(result, began),
    )
