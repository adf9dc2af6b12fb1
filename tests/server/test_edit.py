"""POST /edit and /v1/images/edits through a real uvicorn server: inpainting and image-to-image, and their 4xx."""

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from benchmarks.running import server_thread
from conftest import error_message, metric, post_concurrently
from PIL import Image

from server.settings import Settings
from softdimo import editing, shapes
from softdimo.images import decode_image, encode_image
from softdimo.pipeline import load_pipeline

MODELS = ("one-step", "text", "class")  # the default model first: a one-step text model


@pytest.fixture(scope="module")
def url(tiny_bundles):
    weights = [str(tiny_bundles[name]) for name in MODELS]
    settings = Settings(weights=weights, device="cpu", max_batch_size=8, max_wait_ms=5)
    with server_thread(settings) as base:
        yield base


@pytest.fixture(scope="module")
def scenes() -> np.ndarray:
    return shapes.batch(np.random.default_rng(11), 2)[0]


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def white_box(rows: slice, columns: slice, side: int = 64) -> np.ndarray:
    """A mask PNG's pixels: white (repaint) in the box, black elsewhere."""
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[rows, columns] = 255
    return mask


RIGHT = white_box(slice(10, 40), slice(33, 60))  # token rows 1..4, columns 4..7
CORNER = white_box(slice(0, 8), slice(0, 8))  # the first token alone
FAR_FROM_RIGHT = np.ones((64, 64), dtype=bool)
FAR_FROM_RIGHT[0:48, 24:64] = False  # outside the repainted tokens and one token around them


def images_of(body: dict) -> list[np.ndarray]:
    return [decode_image(base64.b64decode(item["b64_json"])) for item in body["data"]]


def test_edit_returns_n_images_with_their_seeds_and_the_input_far_from_the_mask(url, scenes):
    body = {"image": b64(png(scenes[0])), "mask": b64(png(RIGHT)), "prompt": "a red circle", "n": 3, "seed": 41}
    r = httpx.post(f"{url}/edit", json=body)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("edit-") and body["model"] == "tiny-one-step"
    assert [d["seed"] for d in body["data"]] == [41, 42, 43]
    edited = images_of(body)
    assert len(edited) == 3
    for image in edited:
        assert image.shape == (64, 64, 3)
        assert (image[FAR_FROM_RIGHT] == scenes[0][FAR_FROM_RIGHT]).all()
    assert (edited[0] != edited[1]).any()  # each image its own seed


@pytest.mark.parametrize("model,steps", [("tiny-one-step", None), ("tiny-text", 3)])
def test_an_edit_is_the_librarys_for_the_same_seed(url, tiny_bundles, scenes, model, steps):
    body = {"image": b64(png(scenes[1])), "mask": b64(png(RIGHT)), "prompt": "two blue squares", "seed": 7}
    body["model"] = model
    served = images_of(httpx.post(f"{url}/edit", json=body | ({"steps": steps} if steps else {})).json())[0]
    torch.set_num_threads(1)
    pipeline = load_pipeline(tiny_bundles["one-step" if model == "tiny-one-step" else "text"])
    repaint = editing.repaint_from_mask(RIGHT[None] >= 128, grid=8)
    condition = pipeline.conditioner.encode_prompts(["two blue squares"])
    assert (served == pipeline.edit(scenes[1:2], repaint, condition, [7], steps=steps)[0]).all()


def test_a_class_model_edits_by_class_label(url, scenes):
    body = {"image": b64(png(scenes[0])), "mask": b64(png(RIGHT)), "class_label": 4, "model": "tiny-class", "steps": 2}
    r = httpx.post(f"{url}/edit", json=body)
    assert r.status_code == 200, r.text
    assert (images_of(r.json())[0][FAR_FROM_RIGHT] == scenes[0][FAR_FROM_RIGHT]).all()


def test_without_a_mask_the_strength_chooses_tokens_by_seed(url, scenes):
    def edit(**fields):
        body = {"image": b64(png(scenes[0])), "prompt": "a red circle", "seed": 3} | fields
        r = httpx.post(f"{url}/edit", json=body)
        assert r.status_code == 200, r.text
        return images_of(r.json())[0]

    default = edit()
    assert (default == edit(strength=editing.DEFAULT_STRENGTH)).all()  # no mask, no strength: the default strength
    assert (default != edit(strength=1.0)).any()
    assert (default != edit(seed=4)).any()
    assert (edit(mask=b64(png(RIGHT)), strength=1.0) == edit(mask=b64(png(RIGHT)))).all()  # a mask wins


def test_edits_batched_together_are_each_the_one_made_alone(url, scenes):
    bodies = [
        {"image": b64(png(scenes[0])), "mask": b64(png(RIGHT)), "prompt": "a red circle", "seed": 5, "n": 2},
        {"image": b64(png(scenes[1])), "strength": 0.25, "prompt": "two blue squares", "seed": 9},
        {"image": b64(png(scenes[1])), "mask": b64(png(CORNER)), "prompt": "a green triangle", "seed": 1},
    ]
    together = [images_of(r.json()) for r in post_concurrently(url, "/edit", bodies)]
    alone = [images_of(httpx.post(f"{url}/edit", json=body).json()) for body in bodies]
    for one, other in zip(together, alone):
        assert len(one) == len(other) and all((a == b).all() for a, b in zip(one, other))


def test_an_image_body_and_the_metrics(url, scenes):
    counted = {"endpoint": "/edit", "model": "tiny-one-step"}
    before = metric(httpx.get(f"{url}/metrics").text, "softdimo_images_generated_total", **counted)
    body = {"image": b64(png(scenes[0])), "prompt": "a red circle", "seed": 5}
    raw = httpx.post(f"{url}/edit", json=body, headers={"Accept": "image/png"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png" and raw.headers["x-seed"] == "5"
    assert (decode_image(raw.content) == images_of(httpx.post(f"{url}/edit", json=body).json())[0]).all()
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "softdimo_images_generated_total", **counted) == before + 2
    assert metric(text, "softdimo_requests_total", **counted, status="200") >= 2


def test_refine_runs_tteo_on_the_edit_keeping_the_kept_part(url, scenes):
    steps_before = metric(httpx.get(f"{url}/metrics").text, "softdimo_tteo_steps_total", model="tiny-one-step")
    body = {"image": b64(png(scenes[0])), "mask": b64(png(RIGHT)), "prompt": "a red circle", "n": 2, "seed": 8}
    r = httpx.post(f"{url}/edit", json=body | {"refine": {"steps": 2, "lr": 50.0}})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["id"].startswith("edit-") and [d["seed"] for d in answer["data"]] == [8, 9]
    for item, image in zip(answer["data"], images_of(answer)):
        assert item["candidate_seed"] == item["seed"]  # best_of 1: TTEO starts from the edit /edit draws
        assert (image[FAR_FROM_RIGHT] == scenes[0][FAR_FROM_RIGHT]).all()
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "softdimo_tteo_steps_total", model="tiny-one-step") == steps_before + 2 * 2
    one = body | {"n": 1, "refine": {"steps": 2, "lr": 50.0}}
    raw = httpx.post(f"{url}/edit", json=one, headers={"Accept": "image/png"})
    assert raw.status_code == 200 and float(raw.headers["x-reward-after"]) == answer["data"][0]["reward_after"]
    assert (decode_image(raw.content) == images_of(answer)[0]).all()


SCENE = shapes.batch(np.random.default_rng(11), 1)[0][0]
GOOD = {"image": b64(png(SCENE)), "prompt": "a red circle"}
JPEG = b64(encode_image(SCENE, "jpeg"))
TRUNCATED = b64(png(SCENE)[:60])


@pytest.mark.parametrize(
    "fields,fragment",
    [
        ({"image": "not base64!"}, "image is not base64"),
        ({"image": b64(b"GIF89a, or any bytes that are no image")}, "image is not a PNG image"),
        ({"image": JPEG}, "image is a JPEG image; send a PNG"),
        ({"image": TRUNCATED}, "image is a damaged PNG"),
        ({"image": b64(png(SCENE[:32, :32]))}, "image is 32x32; it must be 64x64"),
        ({"image": b64(png(SCENE[:, :48]))}, "image is 48x64; it must be 64x64"),
        ({"mask": "%%%"}, "mask is not base64"),
        ({"mask": JPEG}, "mask is a JPEG image"),
        ({"mask": b64(png(np.full((32, 32), 255, np.uint8)))}, "mask is 32x32; it must be 64x64"),
        ({"mask": b64(png(np.zeros((64, 64), np.uint8)))}, "nothing to edit: the mask has no white pixel"),
        ({"strength": 1.5}, "less than or equal to 1"),
        ({"strength": -0.1}, "greater than or equal to 0"),
        ({"strength": 0.0}, "nothing to edit: strength 0.0 repaints none of the 64 tokens"),
        ({"strength": 0.007}, "nothing to edit"),  # round(0.007 * 64) = 0
        ({"strength": True}, "valid number"),
        ({"n": 17}, "less than or equal to 16"),
        ({"n": 0}, "greater than or equal to 1"),
        ({"steps": 2}, "one-step: steps applies only to masked-diffusion models"),
        ({"steps": 65, "model": "tiny-text"}, "less than or equal to 64"),
        ({"image": None}, "valid string"),
        ({"image": ""}, "at least 1 character"),
        ({"prompt": "a purple circle"}, "purple"),
        ({"prompt": None, "class_label": 3, "model": "tiny-text"}, "text-conditional"),
        ({"model": "nope"}, "unknown model"),
        ({"colour": "red"}, "Extra inputs"),
        ({"refine": {"steps": 2}, "model": "tiny-text"}, "TTEO needs a one-step model with one"),
        ({"refine": {"reward": "nope"}}, "unknown reward 'nope'"),
        ({"refine": {"steps": 201}}, "less than or equal to 200"),
        ({"refine": {"lr": 0}}, "greater than 0"),
        ({"refine": {"best_of": 17}}, "less than or equal to 16"),
        ({"refine": {"target": "latent"}}, "Extra inputs"),
        ({"refine": {"steps": 200, "best_of": 16}, "n": 16}, "over max_request_cost"),
    ],
)
def test_bad_edits_get_clear_client_errors(url, fields, fragment):
    body = {k: v for k, v in (GOOD | fields).items() if v is not None or k != "prompt"}
    r = httpx.post(f"{url}/edit", json=body)
    assert r.status_code == (404 if fragment.startswith("unknown") else 422), r.text
    assert fragment in r.text


def test_a_missing_image_is_named(url):
    r = httpx.post(f"{url}/edit", json={"prompt": "a red circle"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]


# ---------------------------------------------------------------- the OpenAI Images API's multipart shape


def openai_edit(url: str, *, image: bytes, mask: bytes | None = None, **fields) -> httpx.Response:
    files = {"image": ("image.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    data = {"prompt": "a red circle", "response_format": "b64_json"} | {k: str(v) for k, v in fields.items()}
    return httpx.post(f"{url}/v1/images/edits", files=files, data=data)


def transparent_box(rows: slice, columns: slice) -> np.ndarray:
    """An OpenAI mask: opaque black, fully transparent (repaint) in the box."""
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[rows, columns, 3] = 0
    return rgba


def test_openai_edits_return_n_images_and_read_transparency_as_the_mask(url, scenes):
    mask = png(transparent_box(slice(10, 40), slice(33, 60)), "RGBA")
    r = openai_edit(url, image=png(scenes[0]), mask=mask, n=2, size="64x64", seed=41, quality="high")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"created", "data"} and len(body["data"]) == 2
    for image in images_of(body):
        assert (image[FAR_FROM_RIGHT] == scenes[0][FAR_FROM_RIGHT]).all()
    native = {"image": b64(png(scenes[0])), "mask": b64(png(RIGHT)), "prompt": "a red circle", "seed": 41, "n": 2}
    same = images_of(httpx.post(f"{url}/edit", json=native).json())
    assert all((a == b).all() for a, b in zip(images_of(body), same))


def test_openai_edits_without_a_mask_are_image_to_image(url, scenes):
    r = openai_edit(url, image=png(scenes[1]), seed=3)
    native = {"image": b64(png(scenes[1])), "prompt": "a red circle", "seed": 3}
    assert r.status_code == 200
    assert (images_of(r.json())[0] == images_of(httpx.post(f"{url}/edit", json=native).json())[0]).all()


@pytest.mark.parametrize(
    "fields,status,fragment,param",
    [
        ({"image": b"not an image"}, 422, "image is not a PNG image", None),
        ({"image": png(SCENE[:32, :32])}, 422, "image is 32x32; it must be 64x64", None),
        ({"mask": png(np.zeros((32, 32), np.uint8))}, 422, "mask is 32x32", None),
        ({"mask": png(transparent_box(slice(0, 0), slice(0, 0)), "RGBA")}, 422, "nothing to edit", None),
        ({"n": 17}, 422, "less than or equal to 16", "n"),
        ({"n": "two"}, 422, "valid integer", "n"),
        ({"size": "1024x1024"}, 422, "size '1024x1024' is not available", None),
        ({"response_format": "url"}, 422, "b64_json", "response_format"),
        ({"prompt": "a purple circle"}, 422, "purple", None),
        ({"model": "tiny-class"}, 422, "class-conditional", None),
        ({"model": "dall-e-2"}, 404, "unknown model 'dall-e-2'", None),
    ],
)
def test_bad_openai_edits_get_openai_errors(url, fields, status, fragment, param):
    fields = {"image": png(SCENE)} | fields
    r = openai_edit(url, **fields)
    assert r.status_code == status, r.text
    assert fragment in error_message(r)
    assert r.json()["error"]["param"] == param


def test_an_openai_edit_without_an_image_names_it(url):
    files = {"mask": ("m.png", png(RIGHT), "image/png")}
    r = httpx.post(f"{url}/v1/images/edits", data={"prompt": "a red circle"}, files=files)
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"


def test_a_refined_edit_streams_its_steps_then_the_plain_answer(url, scenes):
    body = {"image": b64(png(scenes[1])), "strength": 0.5, "prompt": "two blue squares", "n": 2, "seed": 21}
    refine = {"steps": 3, "lr": 50.0}
    with httpx.stream("POST", f"{url}/edit", json=body | {"refine": refine | {"stream": True}}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        received = []
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((name, json.loads(line.removeprefix("data: "))))
    steps = [data for name, data in received if name == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3] and all([i["seed"] for i in s["images"]] == [21, 22] for s in steps)
    ((name, final),) = [(n, d) for n, d in received if n != "step"]
    plain = httpx.post(f"{url}/edit", json=body | {"refine": refine}, timeout=60).json()
    assert name == "result" and final["id"].startswith("edit-") and final["data"] == plain["data"]
    refused = httpx.post(f"{url}/edit", json=body | {"model": "tiny-text", "refine": {"stream": True}})
    assert refused.status_code == 422 and refused.headers["content-type"] == "application/json"
