"""Request and response models of the HTTP contract, with their bounds."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SEED = 2**63 - 1
ImageFormat = Literal["png", "jpeg", "webp"]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), strict=True,  # strict: true is not 1 and "3" is not 3
        json_schema_extra={"examples": [{"prompt": "two blue squares", "n": 2, "seed": 7}, {"prompt": "a red circle", "format": "webp"}]},
    )  # fmt: skip

    prompt: str | None = Field(None, min_length=1, max_length=512, description="for text-conditional models")
    class_label: int | None = Field(None, ge=0, description="for class-conditional models")
    n: int = Field(1, ge=1, le=16, description="number of images; image i uses seed + i")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when absent; returned per image")
    model: str | None = Field(None, description="a name from /v1/models; the server's default model when absent")
    format: ImageFormat = "png"
    steps: int | None = Field(None, ge=1, le=64, description="sampling steps, masked-diffusion models only")

    @model_validator(mode="after")
    def _one_condition(self):
        if (self.prompt is None) == (self.class_label is None):
            raise ValueError("give exactly one of prompt and class_label")
        return self


class RefineRequest(GenerateRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "a red circle", "seed": 3, "steps": 2, "lr": 0.5}]})

    steps: int | None = Field(None, ge=1, le=200, description="TTEO gradient steps")
    lr: float | None = Field(None, gt=0, le=100, description="TTEO learning rate")
    reward: str | None = Field(None, description="a reward name from /v1/models")
    best_of: int = Field(1, ge=1, le=16, description="candidates per image; the best by reward is optimised")
    stream: bool = Field(
        False, description="answer text/event-stream: a `step` event per TTEO step (each image's reward), then a `result` "
        "event with the JSON a non-streaming call returns (or an `error` event)",
    )  # fmt: skip


class Timing(BaseModel):
    queue_s: float
    compute_s: float
    total_s: float


class ImageData(BaseModel):
    b64_json: str
    seed: int
    reward_before: float | None = None
    reward_after: float | None = None
    candidate_seed: int | None = Field(None, description="/refine: the seed of the best_of candidate that was optimised")


class ImageResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    model: str
    created: int
    data: list[ImageData]
    timing: Timing


class OpenAIImageRequest(BaseModel):
    """The OpenAI Images API request shape; fields it has that mean nothing here are accepted and ignored."""

    model_config = ConfigDict(
        extra="ignore", protected_namespaces=(), strict=True,
        json_schema_extra={"examples": [{"prompt": "a green triangle", "n": 2, "response_format": "b64_json", "size": "auto"}]},
    )  # fmt: skip

    prompt: str = Field(..., min_length=1, max_length=512)
    n: int = Field(1, ge=1, le=16)
    model: str | None = None
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json: there is no image storage")
    output_format: ImageFormat = "png"
    size: str | None = Field(None, description="accepted when it is the model's size or 'auto'")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)


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
