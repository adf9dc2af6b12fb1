"""The OpenAPI description a deployment serves: FastAPI's, with the bearer scheme when a key is set, and the request
bodies narrowed to the loaded models, as far as JSON Schema can say it.

A request the description admits is one the server serves, or answers 404, 429 or 503 for what no schema can know
(a name it does not have, a full queue, a drain), or 422 for a cost over max_request_cost, which the description
states in words, or for an /edit image or mask that is not a PNG of the model's size or a mask with nothing white,
which no schema can say of base64 text; a request it refuses, the server refuses with a 4xx. Until the models are
loaded it describes the fields alone and is computed again on each call."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Sequence

from fastapi import FastAPI
from pydantic import BaseModel

from server.engine import ServedModel
from server.schemas import (
    EditRequest,
    GenerateJobRequest,
    GenerateRequest,
    OpenAIImageRequest,
    RefineJobRequest,
    RefineRequest,
)
from server.service import EDIT, GENERATE, OPENAI, REFINE
from server.settings import Settings

REQUESTS: list[tuple[str, type[BaseModel]]] = [
    (GENERATE, GenerateRequest),
    (REFINE, RefineRequest),
    (OPENAI, OpenAIImageRequest),
    (EDIT, EditRequest),
    (GENERATE, GenerateJobRequest),
    (REFINE, RefineJobRequest),  # POST /v1/jobs: checked as the endpoint checks them
]
NOTHING = {"not": {}}  # the schema no value satisfies


Served = tuple[Sequence[ServedModel], str]  # the loaded models, and the default model's name


def install(app: FastAPI, *, settings: Settings, models: Callable[[], Served | None]) -> None:
    """Serve `describe` at /openapi.json; `models()` returns (served models, the default's name), or None until loaded."""
    kept: dict | None = None

    def openapi() -> dict:
        nonlocal kept
        if kept is not None:
            return kept
        loaded = models()
        schema = describe(FastAPI.openapi(app), settings=settings, served=loaded)
        if loaded is not None:
            kept = schema
        return schema

    app.openapi = openapi


def describe(base: dict, *, settings: Settings, served: Served | None) -> dict:
    schema = copy.deepcopy(base)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for endpoint, request in REQUESTS:
        # pydantic's own schema: FastAPI writes numeric bounds as floats, and 2^63 - 1 is not one.
        components[request.__name__] = request.model_json_schema(ref_template="#/components/schemas/{model}")
        if served is not None:
            models, default = served
            narrow(
                components[request.__name__],
                endpoint=endpoint,
                models=models,
                default=default,
                max_request_cost=settings.max_request_cost,
            )
        webhook = components[request.__name__]["properties"].get("webhook")
        if webhook is not None and settings.webhook_secret is None:  # no secret to sign with: no webhooks taken
            described = {"type": "null", "description": webhook.get("description", "")}
            components[request.__name__]["properties"]["webhook"] = described
    if settings.api_key is not None:
        add_bearer(schema, exempt=settings.auth_exempt_paths)
    return schema


def add_bearer(schema: dict, *, exempt: Sequence[str]) -> None:
    """A bearer scheme on every operation that needs the key, so /docs can send it."""
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        if path not in exempt:
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]


# ---------------------------------------------------------------- one request body, narrowed


def narrow(request: dict, *, endpoint: str, models: Sequence[ServedModel], default: str, max_request_cost: int) -> None:
    """Add to a request body's schema one branch per model that serves `endpoint`: its name, its conditioning and
    the fields it takes. A request matches exactly one model's branch or is refused.

    The cost limit is said in words only: it bounds a product of fields, which JSON Schema can state only as a
    list of every (n, best_of) pair with its most steps, a few hundred branches that schema tools refuse to draw from."""
    fields = request["properties"]
    request["description"] = (
        f"{request.get('description', '').strip()}\n\nA request costs images x steps x best_of (steps: a teacher's "
        f"sampling steps or the TTEO steps, the model's default when absent; 1 for a one-step /generate); over "
        f"max_request_cost = {max_request_cost} it is refused with 422."
    ).strip()
    serving = [m for m in models if _serves(m, endpoint)]
    # The prompt field carries the Shapes grammar's pattern. Where a model reads another grammar, or free text (a
    # pattern of None: a length in CLIP tokens is no regular expression), each branch says its own instead.
    patterns = {m.conditioner.prompt_pattern() for m in serving if m.conditioning == "text"}
    own = bool(patterns - {_field_pattern(fields["prompt"])})
    if own:
        _drop_field_pattern(fields["prompt"])
    branches = [
        _branch(m, endpoint=endpoint, fields=fields, default=m.name == default, own_pattern=own) for m in serving
    ]
    request["anyOf"] = branches or [NOTHING]


def _serves(model: ServedModel, endpoint: str) -> bool:
    if endpoint == REFINE:
        return bool(model.rewards)  # /refine needs a one-step model with a reward
    if endpoint == OPENAI:
        return model.conditioning == "text"  # the Images API has prompts only
    if endpoint == EDIT:
        return model.edits
    return True


def _branch(model: ServedModel, *, endpoint: str, fields: dict, default: bool, own_pattern: bool) -> dict:
    """The fields as `model` takes them: its name (or none, for the default model), its conditioning, steps only
    for a teacher's /generate, and the Images API's size as the model draws it."""
    conditioner = model.conditioner
    properties: dict = {"model": {"enum": [model.name, None] if default else [model.name]}}
    required = [] if default else ["model"]
    if model.conditioning == "text":
        pattern = conditioner.prompt_pattern() if own_pattern else None
        properties["prompt"] = {"type": "string", **({"pattern": pattern} if pattern is not None else {})}
        if "class_label" in fields:
            properties["class_label"] = {"type": "null"}
        required.append("prompt")
    else:
        properties["class_label"] = {"type": "integer", "maximum": conditioner.num_classes - 1}
        properties["prompt"] = {"type": "null"}
        required.append("class_label")
    if endpoint in (GENERATE, EDIT) and model.kind != "masked-diffusion":
        properties["steps"] = {"type": "null"}  # sampling steps are for masked-diffusion models only
    if endpoint == EDIT and not model.rewards:
        properties["refine"] = {"type": "null"}  # TTEO needs a reward
    if endpoint == OPENAI:
        side = f"{model.image_size}x{model.image_size}"
        properties["size"] = {"enum": [None, "auto", side]}
    return {"properties": properties, "required": required}


def _field_pattern(field: dict) -> str | None:
    return next((part.get("pattern") for part in field.get("anyOf", [field]) if "pattern" in part), None)


def _drop_field_pattern(field: dict) -> None:
    for part in field.get("anyOf", [field]):
        part.pop("pattern", None)
