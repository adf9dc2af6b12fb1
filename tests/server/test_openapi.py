"""The OpenAPI description a deployment serves: the grammar as the prompt's pattern, and request bodies narrowed to
the loaded models. What a validator makes of it is checked here; that the server agrees, by test_schema_fuzz."""

from dataclasses import replace

import pytest
import torch
from fastapi import FastAPI

from server import openapi
from server.app import create_app
from server.engine import Engine
from server.settings import Settings
from softdimo import shapes
from softdimo.text import PromptTokenizer

jsonschema_rs = pytest.importorskip("jsonschema_rs")


@pytest.fixture(scope="module")
def engine(tiny_bundles):
    with torch.enable_grad():  # Engine.load turns gradients off for its thread, here the tests' own
        return Engine.load([str(tiny_bundles[name]) for name in ("one-step", "text", "class")], "cpu")


def _describe(engine: Engine, **settings) -> dict:
    config = Settings(weights=["unused"], **settings)
    base = FastAPI.openapi(create_app(config, engine))
    return openapi.describe(base, settings=config, served=(list(engine.models.values()), engine.default_model))


def _valid(schema: dict, name: str):
    return jsonschema_rs.validator_for(schema["components"]["schemas"][name]).is_valid


def test_before_the_models_load_the_fields_carry_the_grammar_and_exactly_one_condition(tiny_bundles):
    app = create_app(Settings(weights=[str(tiny_bundles["text"])]))
    schema = app.openapi()
    request = schema["components"]["schemas"]["GenerateRequest"]
    assert request["properties"]["prompt"]["anyOf"][0]["pattern"] == shapes.prompt_pattern()
    assert "anyOf" not in request  # no models yet: nothing is said of them
    valid = _valid(schema, "GenerateRequest")
    assert valid({"prompt": "a red circle left of a blue square"}) and valid({"class_label": 3})
    assert not valid({"prompt": "a red circle left of a red circle"})  # the two objects must differ
    assert not valid({"prompt": "a purple circle"}) and not valid({"prompt": "a red circle\n"})
    assert not valid({}) and not valid({"prompt": "a red circle", "class_label": 3})
    assert valid({"prompt": "a red circle", "seed": 2**63 - 1}) and not valid({"prompt": "a red circle", "seed": 2**63})
    assert app.openapi() is not schema  # described again once the models are there


def test_each_model_takes_its_own_conditioning_and_fields(engine):
    schema = _describe(engine)
    names = ("GenerateRequest", "RefineRequest", "OpenAIImageRequest")
    generate, refine, images = (_valid(schema, name) for name in names)
    # The default model (one-step, text) takes a prompt and no sampling steps; the teacher takes steps.
    assert generate({"prompt": "two red circles"}) and generate({"prompt": "two red circles", "model": None})
    assert not generate({"prompt": "two red circles", "steps": 4})
    assert generate({"prompt": "two red circles", "model": "tiny-text", "steps": 4})
    assert not generate({"class_label": 3}) and not generate({"class_label": 3, "model": "tiny-one-step"})
    # The class teacher takes a class label within its classes, and no prompt.
    assert generate({"class_label": 17, "model": "tiny-class"}) and not generate(
        {"class_label": 18, "model": "tiny-class"}
    )
    assert not generate({"prompt": "a red circle", "model": "tiny-class"})
    assert not generate({"prompt": "a red circle", "model": "nope"})  # the server answers 404
    # /refine: only a one-step model with a reward; the Images API: text models, at their size.
    assert refine({"prompt": "a red circle"}) and not refine({"prompt": "a red circle", "model": "tiny-text"})
    assert images({"prompt": "a red circle", "size": "64x64"}) and images({"prompt": "a red circle", "size": "auto"})
    assert not images({"prompt": "a red circle", "size": "1024x1024"})
    assert not images({"prompt": "a red circle", "model": "tiny-class"})
    cost = str(Settings.model_fields["max_request_cost"].default)
    assert f"max_request_cost = {cost}" in schema["components"]["schemas"]["RefineRequest"]["description"]


class FreeText:
    """A conditioner for any text, as a CLIP-prompted model has: no pattern says which prompts fit."""

    conditioning = "text"

    def prompt_pattern(self):
        return None


def test_models_reading_another_grammar_or_free_text_carry_their_own_patterns(engine):
    one_step = engine.models["tiny-one-step"]
    words = replace(one_step.conditioner, grammar=None, prompt_tokenizer=PromptTokenizer(("a", "red", "circle"), 3))
    vocabulary = replace(one_step, name="words", pipeline=replace(one_step.pipeline, conditioner=words))
    free = replace(one_step, name="free", pipeline=replace(one_step.pipeline, conditioner=FreeText()))
    schema = _describe(Engine([*engine.models.values(), vocabulary, free], engine.device))
    request = schema["components"]["schemas"]["GenerateRequest"]
    assert "pattern" not in request["properties"]["prompt"]["anyOf"][0]  # no one pattern holds for every model
    generate = _valid(schema, "GenerateRequest")
    assert generate({"prompt": "circle red a", "model": "words"}) and not generate({"prompt": "circle red a"})
    assert not generate({"prompt": "a red circle red", "model": "words"})  # four words, the model reads three
    assert generate({"prompt": "a red circle left of a blue square"})
    assert generate({"prompt": "an astronaut riding a horse", "model": "free"})
