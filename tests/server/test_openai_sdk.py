"""The official OpenAI Python SDK against /v1: images come back, generated and edited, and a refused request's
message reaches the SDK user."""

import base64
import io

import numpy as np
import openai
import pytest
from benchmarks.running import server_thread
from PIL import Image

from server.settings import Settings
from softdimo import shapes
from softdimo.images import decode_image

KEY = "sdk-test-key"


@pytest.fixture(scope="module")
def client(tiny_bundles):
    settings = Settings(weights=[str(tiny_bundles["one-step"])], device="cpu", max_batch_size=4, api_key=KEY)
    with server_thread(settings) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)


def test_the_sdk_generates_images(client):
    result = client.images.generate(
        prompt="a red circle", n=2, response_format="b64_json", size="64x64", model="tiny-one-step"
    )
    assert len(result.data) == 2
    for image in result.data:
        assert base64.b64decode(image.b64_json)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_prompt_is_an_error_the_sdk_user_can_read(client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.images.generate(prompt="a purple circle", response_format="b64_json")
    error = info.value
    assert error.status_code == 422
    assert "unknown words ['purple']" in error.message and "colors: red" in error.message
    assert error.body["type"] == "invalid_request_error" and error.code == "invalid_value"


def test_out_of_bounds_fields_name_their_parameter(client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.images.generate(prompt="a red circle", n=17, response_format="b64_json")
    assert info.value.param == "n" and "less than or equal to 16" in info.value.message


def test_unknown_models_and_wrong_keys_have_openai_shaped_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(prompt="a red circle", model="dall-e-3", response_format="b64_json")
    assert "unknown model 'dall-e-3'" in info.value.message and info.value.code == "model_not_found"
    wrong = client.with_options(api_key="not-the-key")
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.images.generate(prompt="a red circle", response_format="b64_json")
    assert info.value.code == "invalid_api_key" and "not valid" in info.value.message


def test_native_endpoints_keep_detail(client):
    import httpx

    base = str(client.base_url).removesuffix("/v1/")
    answer = httpx.post(
        f"{base}/generate", json={"prompt": "a purple circle"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 422 and "purple" in answer.json()["detail"]
    unknown = httpx.get(f"{base}/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    error = unknown.json()["error"]
    assert unknown.status_code == 404 and "GET /v1/nothing-here" in error["message"] and error["code"] == "unknown_url"


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_sdk_edits_images(client):
    scene = shapes.batch(np.random.default_rng(2), 1)[0][0]
    mask = np.zeros((64, 64, 4), dtype=np.uint8)
    mask[..., 3] = 255
    mask[:, 32:, 3] = 0  # fully transparent: repaint the right half

    result = client.images.edit(
        image=("scene.png", _png(scene, "RGB"), "image/png"),
        mask=("mask.png", _png(mask, "RGBA"), "image/png"),
        prompt="a red circle",
        n=2,
        response_format="b64_json",
        size="64x64",
        model="tiny-one-step",
    )
    assert len(result.data) == 2
    for item in result.data:
        image = decode_image(base64.b64decode(item.b64_json))
        assert (image[:, :24] == scene[:, :24]).all()  # beyond one patch of the repainted half: the input's pixels
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.images.edit(image=("small.png", _png(scene[:32, :32], "RGB"), "image/png"), prompt="a red circle")
    assert "image is 32x32; it must be 64x64" in info.value.message and info.value.code == "invalid_value"
