"""The HTTP contract through a real uvicorn server on a loopback socket."""

import base64

import httpx
import numpy as np
import pytest
import torch
from benchmarks.running import server_thread
from conftest import metric, post_concurrently

from server.schemas import RefineRequest
from server.settings import Settings
from softdimo.images import decode_image
from softdimo.tteo import TTEOSettings


@pytest.fixture(scope="module")
def url(tiny_bundles):
    settings = Settings(
        weights=[str(tiny_bundles["text"]), str(tiny_bundles["class"])], device="cpu", max_batch_size=8, max_wait_ms=5
    )
    with server_thread(settings) as base:
        yield base


def _image(item) -> np.ndarray:
    return decode_image(base64.b64decode(item["b64_json"]))


def test_health_readiness_and_models(url):
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").status_code == 200
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["name"] for m in models] == ["tiny-text", "tiny-class"]
    text, cls = models
    assert text["kind"] == "masked-diffusion" and text["conditioning"] == "text" and text["image_size"] == 64
    assert text["default"]["steps"] == 4 and text["classes"] is None
    assert cls["conditioning"] == "class" and len(cls["classes"]) == 18 and cls["classes"][0] == "red circle"


def test_generate_returns_every_contract_field(url):
    r = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "n": 3, "seed": 41})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("gen-") and body["model"] == "tiny-text" and isinstance(body["created"], int)
    assert [d["seed"] for d in body["data"]] == [41, 42, 43]
    assert all(_image(d).shape == (64, 64, 3) for d in body["data"])
    timing = body["timing"]
    assert set(timing) == {"queue_s", "compute_s", "total_s"} and timing["total_s"] >= timing["compute_s"] > 0


def test_random_seeds_are_returned_and_reproduce_the_image(url):
    first = httpx.post(f"{url}/generate", json={"prompt": "two blue squares"}).json()["data"][0]
    again = httpx.post(f"{url}/generate", json={"prompt": "two blue squares", "seed": first["seed"]}).json()["data"][0]
    assert 0 <= first["seed"] < 2**63
    assert (_image(first) == _image(again)).all()


def test_class_model_and_steps(url):
    r = httpx.post(f"{url}/generate", json={"class_label": 17, "model": "tiny-class", "steps": 2, "seed": 1})
    assert r.status_code == 200 and r.json()["model"] == "tiny-class"
    other = httpx.post(f"{url}/generate", json={"class_label": 17, "model": "tiny-class", "steps": 3, "seed": 1})
    assert other.status_code == 200
    assert (_image(r.json()["data"][0]) != _image(other.json()["data"][0])).any()  # the steps reached the sampler


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_formats_in_json_and_as_raw_bytes(url, fmt, magic):
    body = httpx.post(f"{url}/generate", json={"prompt": "a green triangle", "format": fmt, "seed": 5}).json()
    assert base64.b64decode(body["data"][0]["b64_json"]).startswith(magic)
    raw = httpx.post(
        f"{url}/generate", json={"prompt": "a green triangle", "seed": 5}, headers={"Accept": f"image/{fmt}"}
    )
    assert raw.status_code == 200 and raw.headers["content-type"] == f"image/{fmt}" and raw.headers["x-seed"] == "5"
    assert raw.content.startswith(magic)


def test_accept_image_wildcard_uses_the_format_field(url):
    raw = httpx.post(
        f"{url}/generate", json={"prompt": "a green triangle", "format": "webp"}, headers={"Accept": "image/*"}
    )
    assert raw.headers["content-type"] == "image/webp"
    many = httpx.post(f"{url}/generate", json={"prompt": "a green triangle", "n": 2}, headers={"Accept": "image/png"})
    assert many.status_code == 406


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ({"prompt": "a purple circle"}, 422, "purple"),
        ({"prompt": "a red circle", "class_label": 1}, 422, "exactly one"),
        ({}, 422, "exactly one"),
        ({"class_label": 3}, 422, "text-conditional"),
        ({"prompt": "a red circle", "model": "tiny-class"}, 422, "class-conditional"),
        ({"class_label": 18, "model": "tiny-class"}, 422, "0..17"),
        ({"prompt": "a red circle", "n": 17}, 422, "less than or equal to 16"),
        ({"prompt": "a red circle", "n": 0}, 422, "greater than or equal to 1"),
        ({"prompt": "a red circle", "seed": -1}, 422, "greater than or equal to 0"),
        ({"prompt": "a red circle", "seed": 2**63}, 422, "less than or equal to"),
        ({"prompt": "a red circle", "steps": 65}, 422, "less than or equal to 64"),
        ({"prompt": "a red circle", "format": "gif"}, 422, "png"),
        ({"prompt": "x" * 513}, 422, "at most 512"),
        ({"prompt": "a red circle", "model": "nope"}, 404, "unknown model"),
        ({"prompt": "a red circle", "model": ""}, 404, "unknown model ''"),  # a name, not a way to say "the default"
        ({"prompt": "a red circle", "colour": "red"}, 422, "Extra inputs"),
        ({"prompt": "a red circle", "seed": False}, 422, "valid integer"),
        ({"prompt": "a red circle", "n": True}, 422, "valid integer"),
        ({"prompt": "a red circle", "seed": 3.5}, 422, "valid integer"),
        ({"prompt": "a red circle", "seed": "3"}, 422, "valid integer"),
        ({"class_label": True, "model": "tiny-class"}, 422, "valid integer"),
    ],
)
def test_bad_requests_get_clear_client_errors(url, body, status, fragment):
    r = httpx.post(f"{url}/generate", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.text


def test_seeds_wrap_below_2_63_and_a_whole_number_written_3_0_is_3(url):
    top = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "seed": 2**63 - 2, "n": 3}).json()["data"]
    assert [d["seed"] for d in top] == [2**63 - 2, 2**63 - 1, 0]
    zero = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "seed": 0.0, "n": 1.0}).json()["data"]
    assert zero[0]["seed"] == 0 and (_image(zero[0]) == _image(top[2])).all()  # the third image is seed 0's


def test_malformed_json_is_422_not_500(url):
    r = httpx.post(f"{url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_openai_images_shape(url):
    r = httpx.post(
        f"{url}/v1/images/generations",
        json={"prompt": "a red circle", "n": 2, "response_format": "b64_json", "size": "64x64"},
    )
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"created", "data"} and len(body["data"]) == 2 and set(body["data"][0]) == {"b64_json"}
    assert (
        httpx.post(
            f"{url}/v1/images/generations", json={"prompt": "a red circle", "response_format": "url"}
        ).status_code
        == 422
    )
    assert (
        httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "size": "1024x1024"}).status_code
        == 422
    )
    for field, value in (
        ("seed", False),
        ("n", True),
        ("seed", "7"),
    ):  # no coercion: a bool or a string is not a number
        refused = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", field: value})
        assert refused.status_code == 422 and "valid integer" in refused.text


def test_refine_on_a_teacher_is_a_clear_422(url):
    r = httpx.post(f"{url}/refine", json={"prompt": "a red circle"})
    assert r.status_code == 422 and "one-step" in r.text


def test_same_seed_same_image_under_concurrent_mixed_traffic(url):
    requests = [
        {"prompt": p, "seed": s, "n": n}
        for p, s, n in [
            ("a red circle", 7, 1),
            ("three cyan triangles", 100, 3),
            ("a blue square above a red circle", 9, 2),
            ("a red circle", 7, 2),
            ("a large yellow circle", 55, 1),
            ("three cyan triangles", 101, 1),
        ]
    ]
    requests += [{"class_label": 4, "model": "tiny-class", "seed": 3, "n": 2}]

    alone = [post_concurrently(url, "/generate", [b])[0].json() for b in requests]
    together = post_concurrently(url, "/generate", requests * 3)
    for i, response in enumerate(together):
        expected = alone[i % len(requests)]
        got = response.json()
        assert [d["seed"] for d in got["data"]] == [d["seed"] for d in expected["data"]]
        for a, b in zip(got["data"], expected["data"]):
            assert (_image(a) == _image(b)).all()
    # seed 7 as the first of two images equals seed 7 alone; seed 101 alone equals the second of (100, n=3)
    assert (_image(alone[0]["data"][0]) == _image(alone[3]["data"][0])).all()
    assert (_image(alone[5]["data"][0]) == _image(alone[1]["data"][1])).all()


def test_metrics_move(url):
    before = httpx.get(f"{url}/metrics").text
    httpx.post(f"{url}/generate", json={"prompt": "a red circle", "n": 2})
    httpx.post(f"{url}/generate", json={"prompt": "a red circle", "model": "nope"})
    after = httpx.get(f"{url}/metrics").text
    ok = dict(endpoint="/generate", model="tiny-text", status="200")
    assert metric(after, "softdimo_requests_total", **ok) == metric(before, "softdimo_requests_total", **ok) + 1
    assert metric(after, "softdimo_requests_total", endpoint="/generate", model="unknown", status="404") >= 1
    images = dict(endpoint="/generate", model="tiny-text")
    assert (
        metric(after, "softdimo_images_generated_total", **images)
        == metric(before, "softdimo_images_generated_total", **images) + 2
    )
    assert metric(after, "softdimo_batch_size_count", **images) > metric(before, "softdimo_batch_size_count", **images)
    assert metric(after, "softdimo_request_duration_seconds_count", **images) > 0
    assert metric(after, "softdimo_queue_wait_seconds_count", **images) > 0
    for name in ["softdimo_queue_depth", "softdimo_inflight_requests", "softdimo_rejected_total"]:
        assert name in after
    assert 'le="120.0"' in after


def test_full_queue_answers_429_with_retry_after_and_nothing_else_fails(tiny_bundles):
    settings = Settings(weights=[str(tiny_bundles["text"])], device="cpu", max_batch_size=1, max_queue=1, max_wait_ms=0)
    with server_thread(settings) as base:
        responses = post_concurrently(base, "/generate", [{"prompt": "a red circle", "seed": i} for i in range(40)])
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) > 0
        assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert httpx.post(f"{base}/generate", json={"prompt": "a red circle"}).status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert metric(metrics, "softdimo_rejected_total", endpoint="/generate", reason="queue_full") == statuses.count(
            429
        )


def test_deadline_answers_504(tiny_bundles):
    settings = Settings(weights=[str(tiny_bundles["text"])], device="cpu", request_timeout_s=0.0005)
    with server_thread(settings) as base:
        r = httpx.post(f"{base}/generate", json={"prompt": "a red circle", "n": 16})
        assert r.status_code == 504 and "not served within" in r.text


@pytest.fixture(scope="module")
def one_step_url(tiny_bundles):
    weights = [str(tiny_bundles["one-step"]), str(tiny_bundles["one-step-class"]), str(tiny_bundles["text"])]
    with server_thread(Settings(weights=weights, device="cpu", max_batch_size=8, max_wait_ms=5)) as base:
        yield base


def test_one_step_models_are_listed_with_rewards_and_refine_defaults(one_step_url):
    models = {m["name"]: m for m in httpx.get(f"{one_step_url}/v1/models").json()["data"]}
    card = models["tiny-one-step"]
    assert card["kind"] == "one-step" and card["rewards"] == ["tiny-clip"]
    assert card["default"]["refine"] == {"steps": 3, "lr": 1.0, "best_of": 1, "target": "input", "reward": "tiny-clip"}
    # what a request that leaves best_of out gets, over HTTP and on the CLI alike
    assert RefineRequest(prompt="a red circle").best_of == TTEOSettings(best_of=4).for_request().best_of == 1


def test_one_step_generate_refuses_steps(one_step_url):
    assert httpx.post(f"{one_step_url}/generate", json={"prompt": "a red circle"}).status_code == 200
    r = httpx.post(f"{one_step_url}/generate", json={"prompt": "a red circle", "steps": 4})
    assert r.status_code == 422 and "one-step" in r.text


def test_refine_returns_rewards_and_starts_from_the_generated_image(one_step_url):
    # a step too small to change anything shows the starting point
    r = httpx.post(
        f"{one_step_url}/refine", json={"prompt": "a red circle", "seed": 12, "n": 2, "steps": 1, "lr": 1e-9}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("ref-") and [d["seed"] for d in body["data"]] == [12, 13]
    for item in body["data"]:
        assert (
            item["reward_before"] == pytest.approx(item["reward_after"], abs=1e-5)
            and item["candidate_seed"] == item["seed"]
        )
    generated = httpx.post(f"{one_step_url}/generate", json={"prompt": "a red circle", "seed": 12, "n": 2}).json()
    for a, b in zip(body["data"], generated["data"]):
        assert (_image(a) == _image(b)).all()


def test_refine_steps_find_an_image_the_reward_prefers_and_report_its_scores(one_step_url, tiny_bundles):
    from softdimo.bundle import read_bundle
    from softdimo.pipeline import load_reward

    reward = load_reward(read_bundle(tiny_bundles["reward"]))

    def score(item) -> float:  # the reward model's score of an answer's image (rounded to 8 bits, hence the 0.03)
        image = torch.from_numpy(_image(item)).permute(2, 0, 1)[None].float() / 255
        return reward.score(image, ["a red circle"]).item()

    # on seed 13 the model's own TTEO settings (3 steps at lr 1) raise the reward by about 0.08
    item = httpx.post(f"{one_step_url}/refine", json={"prompt": "a red circle", "seed": 13}).json()["data"][0]
    generated = httpx.post(f"{one_step_url}/generate", json={"prompt": "a red circle", "seed": 13}).json()["data"][0]
    assert item["reward_after"] > item["reward_before"] + 0.05
    assert not (_image(item) == _image(generated)).all()
    assert item["reward_before"] == pytest.approx(score(generated), abs=0.03)
    assert item["reward_after"] == pytest.approx(score(item), abs=0.03)


def test_refine_errors(one_step_url):
    assert httpx.post(f"{one_step_url}/refine", json={"prompt": "a red circle", "reward": "nope"}).status_code == 404
    assert httpx.post(f"{one_step_url}/refine", json={"prompt": "a red circle", "steps": 201}).status_code == 422
    assert httpx.post(f"{one_step_url}/refine", json={"prompt": "a red circle", "lr": 0}).status_code == 422
    assert httpx.post(f"{one_step_url}/refine", json={"prompt": "a red circle", "best_of": 17}).status_code == 422
    teacher = httpx.post(f"{one_step_url}/refine", json={"prompt": "a red circle", "model": "tiny-text"})
    assert teacher.status_code == 422 and "one-step" in teacher.text


def test_concurrent_refines_with_mixed_settings_match_their_solo_results(one_step_url):
    bodies = [
        {"prompt": "a red circle", "seed": 1, "steps": 2},
        {"prompt": "two blue squares", "seed": 2, "steps": 3, "best_of": 2},
        {"class_label": 5, "model": "tiny-one-step-class", "seed": 3, "steps": 2},
        {"prompt": "a green triangle", "seed": 4, "steps": 2, "n": 2},
    ]

    alone = [post_concurrently(one_step_url, "/refine", [b])[0].json() for b in bodies]
    together = post_concurrently(one_step_url, "/refine", bodies * 2)
    for i, response in enumerate(together):
        assert response.status_code == 200
        for a, b in zip(response.json()["data"], alone[i % len(bodies)]["data"]):
            assert (_image(a) == _image(b)).all()
            assert a["reward_after"] == pytest.approx(b["reward_after"], abs=1e-4)
    metrics = httpx.get(f"{one_step_url}/metrics").text
    assert metric(metrics, "softdimo_tteo_steps_total", model="tiny-one-step") > 0
    assert metric(metrics, "softdimo_reward_gain_count", model="tiny-one-step") > 0
