"""Request and response models of the HTTP contract, with their bounds."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from softdimo import seeding, shapes
from softdimo.editing import DEFAULT_STRENGTH
from softdimo.tteo import REQUEST_BEST_OF

LARGEST_SEED = seeding.MAX_SEED - 1  # seeds are 0 <= seed < seeding.MAX_SEED
MAX_IMAGES = 16  # images one request may ask for (`n`)
ImageFormat = Literal["png", "jpeg", "webp"]


class _GrammarPattern:
    """The Shapes grammar as the prompt's `pattern`, in the schema only: the model's conditioner checks prompts
    and answers 422 with a message naming the vocabulary, which a pattern mismatch could not."""

    def __get_pydantic_json_schema__(self, core_schema, handler):
        schema = handler(core_schema)
        schema["pattern"] = shapes.prompt_pattern()
        return schema


Prompt = Annotated[str, StringConstraints(min_length=1, max_length=512), _GrammarPattern()]

# What `_one_condition` checks, said in the schema: exactly one of prompt and class_label is given and not null.
ONE_CONDITION = [
    {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    {"required": ["class_label"], "properties": {"class_label": {"type": "integer"}}},
]


class StrictRequest(BaseModel):
    """A request body read strictly (true is not 1 and "3" is not 3), where a whole number written 3.0 is still
    the integer 3, as JSON Schema reads `"type": "integer"`; 3.5 stays refused."""

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data):
        if not isinstance(data, dict):
            return data
        integers = {
            name for name, field in cls.model_fields.items() if int in (field.annotation, *get_args(field.annotation))
        }
        return {k: int(v) if k in integers and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}


class GenerateRequest(StrictRequest):
    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        strict=True,  # strict: true is not 1 and "3" is not 3
        json_schema_extra={
            "examples": [
                {"prompt": "two blue squares", "n": 2, "seed": 7},
                {"prompt": "a red circle", "format": "webp"},
            ],
            "oneOf": ONE_CONDITION,
        },
    )

    prompt: Prompt | None = Field(
        None, description="for text-conditional models: a prompt of the model's grammar (Shapes)"
    )
    class_label: int | None = Field(None, ge=0, description="for class-conditional models")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="number of images; image i uses seed + i (modulo 2^63)")
    seed: int | None = Field(None, ge=0, le=LARGEST_SEED, description="random when absent; returned per image")
    model: str | None = Field(None, description="a name from /v1/models; the server's default model when absent")
    format: ImageFormat = "png"
    steps: int | None = Field(None, ge=1, le=64, description="sampling steps, masked-diffusion models only")

    @model_validator(mode="after")
    def _one_condition(self):
        if (self.prompt is None) == (self.class_label is None):
            raise ValueError("give exactly one of prompt and class_label")
        return self


class RefineRequest(GenerateRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"prompt": "a red circle", "seed": 3, "steps": 2, "lr": 0.5}],
            "oneOf": ONE_CONDITION,
        }
    )

    steps: int | None = Field(None, ge=1, le=200, description="TTEO gradient steps")
    lr: float | None = Field(None, gt=0, le=100, description="TTEO learning rate")
    reward: str | None = Field(None, description="a reward name from /v1/models")
    best_of: int = Field(
        REQUEST_BEST_OF, ge=1, le=16, description="candidates per image; the best by reward is optimised"
    )
    stream: bool = Field(
        False,
        description="answer text/event-stream: a `step` event per TTEO step (each image's reward), then a `result` "
        "event with the JSON a non-streaming call returns (or an `error` event)",
    )


PNG_DESCRIPTION = "a PNG file as base64 (a `data:image/png;base64,` prefix is allowed)"
# /edit's example: an empty 64x64 canvas (the Shapes models' size), and a mask over its right half.
EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAIklEQVR42u3BAQ0AAADCoPdPbQ8HFAAAAAAAAAAAAAAA8G4wQAAB7OHIlwAAAABJ"
    "RU5ErkJggg=="
)
EXAMPLE_MASK = (
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAAAAACPAi4CAAAAL0lEQVR42u3MoQ0AAAjAMOD/n+EEBAbR2SXNWOrlVxwDAAAAAAAAAAAAAAAA8B0Y"
    "ME0Bf4GC+EEAAAAASUVORK5CYII="
)


class EditRefinement(StrictRequest):
    """/edit's `refine`: TTEO on the edit, with the settings of /refine (the model's where left out)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{"steps": 10, "lr": 0.5}]})

    steps: int | None = RefineRequest.model_fields["steps"]
    lr: float | None = RefineRequest.model_fields["lr"]
    reward: str | None = RefineRequest.model_fields["reward"]
    best_of: int = RefineRequest.model_fields["best_of"]
    stream: bool = RefineRequest.model_fields["stream"]


class EditRequest(GenerateRequest):
    """The fields of /generate plus the image to edit, and where to repaint it: a mask, or else a strength."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"image": EXAMPLE_IMAGE, "mask": EXAMPLE_MASK, "prompt": "a red circle", "n": 2, "seed": 7},
                {"image": EXAMPLE_IMAGE, "strength": 0.25, "prompt": "two blue squares"},
            ],
            "oneOf": ONE_CONDITION,
        }
    )

    image: str = Field(..., min_length=1, description=f"the image to edit: {PNG_DESCRIPTION}, at the model's size")
    mask: str | None = Field(
        None,
        min_length=1,
        description=f"where to repaint: {PNG_DESCRIPTION} of the image's size; white pixels "
        "(luminance 128 or more) are repainted, and with them every token whose patch they touch (a diffusers MUSE "
        "teacher: the tokens AmusedInpaintPipeline repaints)",
    )
    strength: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description=f"without a mask: the share of the image's tokens to repaint (image-to-image), chosen at random by "
        f"each image's seed (a diffusers MUSE teacher: AmusedImg2ImgPipeline's strength); {DEFAULT_STRENGTH} when "
        "absent too. Ignored with a mask.",
    )
    refine: EditRefinement | None = Field(
        None,
        description="TTEO on the edit (one-step models with a reward): it starts from the edit drawn without "
        "it, and the kept tokens and pixels stay the input's; each image then carries reward_before and reward_after",
    )


class Timing(BaseModel):
    queue_s: float
    compute_s: float
    total_s: float


class ImageData(BaseModel):
    b64_json: str
    seed: int
    reward_before: float | None = None
    reward_after: float | None = None
    candidate_seed: int | None = Field(
        None, description="/refine: the seed of the best_of candidate that was optimised"
    )


class ImageResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    model: str
    created: int
    data: list[ImageData]
    timing: Timing


Webhook = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=r"^https?://[^/?#\s]+[^\s]*$")]
WEBHOOK_DESCRIPTION = "called with the job when it ends (POST, Standard Webhooks signature); public http(s) hosts only"


class GenerateJobRequest(GenerateRequest):
    """POST /v1/jobs with the body of /generate."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"endpoint": "generate", "prompt": "a red circle", "seed": 3}],
            "oneOf": ONE_CONDITION,
        }
    )

    endpoint: Literal["generate"]
    webhook: Webhook | None = Field(None, description=WEBHOOK_DESCRIPTION)


class RefineJobRequest(RefineRequest):
    """POST /v1/jobs with the body of /refine (progress comes from GET /v1/jobs/{id}/events, not `stream`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"endpoint": "refine", "prompt": "a red circle", "seed": 3, "steps": 20}],
            "oneOf": ONE_CONDITION,
        }
    )

    endpoint: Literal["refine"]
    webhook: Webhook | None = Field(None, description=WEBHOOK_DESCRIPTION)
    stream: Literal[False] = Field(False, description="not for jobs: follow GET /v1/jobs/{id}/events instead")


JobRequest = Annotated[GenerateJobRequest | RefineJobRequest, Field(discriminator="endpoint")]
JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobAccepted(BaseModel):
    id: str
    status: JobStatusName
    created: int


class JobError(BaseModel):
    status: int
    detail: str


class JobResponse(BaseModel):
    """A job as GET /v1/jobs/{id} answers it; `result` is what the synchronous endpoint answers for its body."""

    id: str
    endpoint: Literal["generate", "refine"]
    status: JobStatusName
    created: int
    progress: dict | None = Field(None, description="/refine: {step, steps, images: [{seed, reward}]} of the last step")
    result: ImageResponse | None = None
    error: JobError | None = None


class OpenAIImageRequest(StrictRequest):
    """The OpenAI Images API request shape; fields it has that mean nothing here are accepted and ignored."""

    model_config = ConfigDict(
        extra="ignore",
        protected_namespaces=(),
        strict=True,
        json_schema_extra={
            "examples": [{"prompt": "a green triangle", "n": 2, "response_format": "b64_json", "size": "auto"}]
        },
    )

    prompt: Prompt = Field(..., description="a prompt of the model's grammar (Shapes)")
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    model: str | None = None
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json: there is no image storage")
    output_format: ImageFormat = "png"
    size: str | None = Field(None, description="accepted when it is the model's size or 'auto'")
    seed: int | None = Field(None, ge=0, le=LARGEST_SEED)


class OpenAIEditRequest(BaseModel):
    """The OpenAI Images API's edit request, multipart/form-data; fields it has that mean nothing here are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    image: UploadFile = Field(..., description="the image to edit: a PNG at the model's size")
    mask: UploadFile | None = Field(
        None,
        description="a PNG of the image's size: where it is fully transparent (or, without an alpha channel, "
        "white), the image is repainted, and with it every token whose patch it touches. Without a mask, "
        f"image-to-image repaints a share of {DEFAULT_STRENGTH} of the tokens, chosen by each image's seed",
    )
    prompt: Prompt = Field(..., description="a prompt of the model's grammar (Shapes)")
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    model: str | None = None
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json: there is no image storage")
    output_format: ImageFormat = "png"
    size: str | None = Field(None, description="accepted when it is the model's size or 'auto'")
    seed: int | None = Field(None, ge=0, le=LARGEST_SEED)


class OpenAIImage(BaseModel):
    b64_json: str


class OpenAIImageResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class ModelCard(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    kind: Literal["one-step", "masked-diffusion"]
    conditioning: Literal["text", "class"]
    image_size: int
    classes: list[str] | None = None
    rewards: list[str] = []
    default: dict


class ModelList(BaseModel):
    data: list[ModelCard]


class ErrorResponse(BaseModel):
    detail: str


class ValidationIssue(BaseModel):
    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """422: FastAPI's list of issues for a malformed body, or one message for a request the model cannot take."""

    detail: list[ValidationIssue] | str


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """Every error under /v1/: an OpenAI error object, what the OpenAI SDKs read a failed request's message from."""

    error: OpenAIErrorBody


class Status(BaseModel):
    status: str = Field(..., description="ok, ready, loading, draining, or failed: <reason>")
