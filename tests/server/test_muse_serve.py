"""A diffusers MUSE model end to end: a tiny aMUSEd on disk is loaded, distilled a few steps, and both teacher and
one-step student are served over a real socket, /generate (with steps), /refine, /edit and /v1/images/edits (the
teacher's edits diffusers' own, the student's softdimo's), with bad input refused."""

import base64
import io
import os

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from benchmarks.running import server_thread  # noqa: E402
from tiny_muse import write_clip_reward, write_teacher  # noqa: E402

from server.settings import Settings  # noqa: E402
from softdimo.images import decode_image  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict:
    import torch

    from softdimo import muse
    from softdimo.bundle import read_bundle
    from softdimo.generator import GeneratorSettings
    from softdimo.pipeline import load_pipeline, load_reward
    from softdimo.train.distill import DistillParts, DistillTraining, train_distill

    root = tmp_path_factory.mktemp("muse-serve")
    teacher_path, clip_path = write_teacher(root / "teacher"), write_clip_reward(root / "clip")
    teacher = load_pipeline(teacher_path)
    parts = DistillParts(
        teacher=teacher.model,
        tokenizer=teacher.tokenizer,
        conditioner=teacher.conditioner,
        reward=load_reward(read_bundle(clip_path)),
    )
    training = DistillTraining(steps=2, batch_size=4, warmup=1, guidance=1.0, reward_weight=0.5, eval_every=0)
    with torch.random.fork_rng():
        student = train_distill(
            run_dir=root / "run", parts=parts, generator_settings=GeneratorSettings(), training=training, device="cpu"
        )
    student_path = muse.export_generator(
        generator=student,
        teacher=read_bundle(teacher_path),
        path=root / "student",
        name="tiny-amused-one-step",
        reward_references=[os.path.relpath(clip_path, root / "student")],
        tteo={"steps": 2, "lr": 1.0},
        training={},
        teacher_reference=os.path.relpath(teacher_path, root / "student"),
    )
    return {"student": student_path, "teacher": teacher_path}


@pytest.fixture(scope="module")
def url(bundles):
    weights = [str(bundles["student"]), str(bundles["teacher"])]
    settings = Settings(weights=weights, device="cpu", max_batch_size=4, max_wait_ms=5)
    with server_thread(settings) as base:
        yield base


def _images(response) -> list[np.ndarray]:
    return [decode_image(base64.b64decode(d["b64_json"])) for d in response.json()["data"]]


def test_models_are_listed_with_their_kinds(url):
    models = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    student, teacher = models["tiny-amused-one-step"], models["tiny-amused"]
    assert student["kind"] == "one-step" and student["rewards"] == ["tiny-clip-vit"] and student["image_size"] == 16
    assert (
        teacher["kind"] == "masked-diffusion" and teacher["conditioning"] == "text" and teacher["default"]["steps"] == 4
    )


def test_generate_and_refine_serve_free_text_prompts(url):
    teacher = httpx.post(
        f"{url}/generate",
        json={"model": "tiny-amused", "prompt": "A lighthouse at dusk", "n": 2, "seed": 5, "steps": 3},
    )
    assert teacher.status_code == 200, teacher.text
    assert [image.shape for image in _images(teacher)] == [(16, 16, 3)] * 2
    again = httpx.post(
        f"{url}/generate", json={"model": "tiny-amused", "prompt": "A lighthouse at dusk", "seed": 6, "steps": 3}
    )
    assert np.array_equal(_images(again)[0], _images(teacher)[1])  # image i uses seed + i, whatever its batch

    one_step = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "seed": 1})
    assert one_step.status_code == 200 and one_step.json()["model"] == "tiny-amused-one-step"
    # on seed 1, two steps at lr 100 find an image the CLIP reward prefers (by about 0.011): a new image
    body = {"prompt": "a red circle", "seed": 1, "steps": 2, "lr": 100.0}
    refined = httpx.post(f"{url}/refine", json=body, timeout=60)
    assert refined.status_code == 200, refined.text
    item = refined.json()["data"][0]
    assert item["reward_after"] > item["reward_before"] + 0.005
    assert _images(refined)[0].shape == (16, 16, 3) and not np.array_equal(_images(refined)[0], _images(one_step)[0])


def test_bad_input_is_a_clear_4xx(url):
    too_long = httpx.post(f"{url}/generate", json={"prompt": "and " * 40, "seed": 1})
    assert too_long.status_code == 422 and "CLIP tokens long" in too_long.json()["detail"]
    label = httpx.post(f"{url}/generate", json={"class_label": 3})
    assert label.status_code == 422 and "text-conditional" in label.json()["detail"]
    steps = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "steps": 4})
    assert steps.status_code == 422 and "one-step" in steps.json()["detail"]
    assert httpx.post(f"{url}/refine", json={"model": "tiny-amused", "prompt": "a red circle"}).status_code == 422
    assert httpx.get(f"{url}/openapi.json").status_code == 200


def _b64_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


IMAGE = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
RIGHT = np.zeros((16, 16), dtype=np.uint8)
RIGHT[:, 12:] = 255  # token columns 6 and 7 of the 8x8 grid
EDIT = {"image": _b64_png(IMAGE), "mask": _b64_png(RIGHT), "prompt": "A lighthouse at dusk", "seed": 2}


def test_the_one_step_student_edits_keeping_the_input_away_from_the_mask(url):
    edited = httpx.post(f"{url}/edit", json=EDIT | {"n": 2})
    assert edited.status_code == 200, edited.text
    assert [e.shape for e in _images(edited)] == [(16, 16, 3)] * 2
    assert all((e[:, :8] == IMAGE[:, :8]).all() for e in _images(edited))  # beyond one patch of the mask: the input's
    refined = httpx.post(f"{url}/edit", json=EDIT | {"refine": {"steps": 1}}, timeout=60)
    assert refined.status_code == 200 and refined.json()["data"][0]["reward_after"] is not None, refined.text


def test_the_teacher_edits_as_diffusers_does(url, bundles):
    """/edit and /v1/images/edits on the teacher serve what its pipeline draws, which is AmusedInpaintPipeline's with
    a mask and AmusedImg2ImgPipeline's with a strength (tests/softdimo/test_muse.py): image i from seed + i."""
    from softdimo.pipeline import load_pipeline

    teacher = load_pipeline(bundles["teacher"])
    condition = teacher.conditioner.encode_prompts([EDIT["prompt"]] * 2)
    images, seeds = np.stack([IMAGE, IMAGE]), [2, 3]
    repaint = teacher.repaint_from_mask(RIGHT[None] >= 128).expand(2, -1)
    assert repaint[0].view(8, 8)[:, 6:].all() and not repaint[0].view(8, 8)[:, :6].any()

    inpainted = httpx.post(f"{url}/edit", json=EDIT | {"model": "tiny-amused", "steps": 2, "n": 2})
    assert inpainted.status_code == 200, inpainted.text
    assert np.array_equal(np.stack(_images(inpainted)), teacher.edit(images, repaint, condition, seeds, steps=2))
    body = {k: v for k, v in EDIT.items() if k != "mask"} | {"model": "tiny-amused", "strength": 0.75, "n": 2}
    image_to_image = httpx.post(f"{url}/edit", json=body)
    assert image_to_image.status_code == 200, image_to_image.text
    expected = teacher.edit_at_strength(images, 0.75, condition, seeds)
    assert np.array_equal(np.stack(_images(image_to_image)), expected)
    assert not np.array_equal(expected, teacher.edit_at_strength(images, 0.5, condition, seeds))

    form = {"prompt": EDIT["prompt"], "model": "tiny-amused", "seed": "2"}
    files = {"image": ("image.png", base64.b64decode(EDIT["image"]), "image/png")}
    openai = httpx.post(f"{url}/v1/images/edits", data=form, files=files)
    assert openai.status_code == 200, openai.text
    image = decode_image(base64.b64decode(openai.json()["data"][0]["b64_json"]))  # without a mask: the default strength
    assert np.array_equal(image, teacher.edit_at_strength(images[:1], 0.5, condition[:1], seeds[:1])[0])


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"mask": _b64_png(np.full((8, 8), 255, np.uint8))}, "mask is 8x8; it must be 16x16"),
        ({"image": _b64_png(IMAGE[:8])}, "image is 16x8; it must be 16x16"),
        ({"mask": _b64_png(np.pad(np.full((1, 1), 255, np.uint8), ((7, 8), (7, 8))))}, "repaint none of the 64 tokens"),
        ({"mask": None, "strength": 1.0}, "nothing to edit: strength 1.0 repaints none of the 64 tokens"),
        ({"mask": None, "strength": 0.2}, "nothing to edit"),  # int(4 * 0.2) = 0 steps
        ({"refine": {"steps": 1}}, "without a reward"),
        ({"class_label": 1, "prompt": None}, "text-conditional"),
    ],
)
def test_bad_teacher_edits_get_a_clear_4xx(url, fields, fragment):
    body = {k: v for k, v in (EDIT | {"model": "tiny-amused"} | fields).items() if v is not None}
    response = httpx.post(f"{url}/edit", json=body)
    assert response.status_code == 422 and fragment in response.text, response.text
