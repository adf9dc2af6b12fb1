"""A diffusers MUSE model end to end: a tiny aMUSEd on disk is loaded, distilled a few steps, and both teacher and
one-step student are served over a real socket, /generate (with steps), /refine and /edit, with bad input refused."""

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
def url(tmp_path_factory):
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
    settings = Settings(weights=[str(student_path), str(teacher_path)], device="cpu", max_batch_size=4, max_wait_ms=5)
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


def test_the_one_step_student_edits_and_the_diffusers_teacher_says_it_does_not(url):
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 12:] = 255  # token columns 6 and 7 of the 8x8 grid
    body = {"image": _b64_png(image), "mask": _b64_png(mask), "prompt": "A lighthouse at dusk", "seed": 2}
    edited = httpx.post(f"{url}/edit", json=body | {"n": 2})
    assert edited.status_code == 200, edited.text
    assert [e.shape for e in _images(edited)] == [(16, 16, 3)] * 2
    assert all((e[:, :8] == image[:, :8]).all() for e in _images(edited))  # beyond one patch of the mask: the input's
    refined = httpx.post(f"{url}/edit", json=body | {"refine": {"steps": 1}}, timeout=60)
    assert refined.status_code == 200 and refined.json()["data"][0]["reward_after"] is not None, refined.text
    teacher = httpx.post(f"{url}/edit", json=body | {"model": "tiny-amused", "steps": 2})
    assert teacher.status_code == 422 and "does not edit images" in teacher.json()["detail"]
