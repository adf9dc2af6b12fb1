"""The judge passes rendered images and fails corrupted ones, for the reason a person would give."""

import numpy as np
import pytest

from softdimo import judge, shapes


def _scene(prompt: str, seed: int = 0):
    parsed = shapes.parse_prompt(prompt)
    objects = shapes.sample_scene(parsed, np.random.default_rng(seed))
    return parsed, objects


def test_rendered_images_pass():
    prompts = judge.held_out_prompts(200, seed=3)
    rng = np.random.default_rng(3)
    images = [shapes.render(shapes.sample_scene(p, rng)) for p in prompts]
    rates = judge.pass_rates(images, prompts)
    assert rates.overall == 1.0 and set(rates.per_kind) == set(shapes.KINDS)


def test_detect_reads_objects_exactly():
    objects = [shapes.ShapeObject(2, 2, 24, 5, 30), shapes.ShapeObject(4, 0, 12, 40, 6)]
    found, stray = judge.detect(shapes.render(objects))
    assert stray == 0
    assert sorted((o.color, o.shape, o.size, o.x0, o.y0) for o in found) == [(2, 2, 24, 5, 30), (4, 0, 12, 40, 6)]


def test_missing_object_fails():
    prompt, objects = _scene("a red circle and a blue square")
    verdict = judge.judge(shapes.render(objects[:1]), prompt)
    assert not verdict.passed and verdict.reason.startswith("count")


def test_extra_object_fails():
    prompt, objects = _scene("two green triangles")
    placed = next(
        shapes.ShapeObject(0, 1, 12, x, y)
        for x in range(2, 50)
        for y in range(2, 50)
        if all(shapes.box_gap(shapes.ShapeObject(0, 1, 12, x, y), o) >= 2 for o in objects)
    )
    verdict = judge.judge(shapes.render([*objects, placed]), prompt)
    assert not verdict.passed and verdict.reason.startswith("count")


def test_recoloured_object_fails():
    prompt, objects = _scene("a large yellow square")
    o = objects[0]
    verdict = judge.judge(shapes.render([shapes.ShapeObject(1, o.shape, o.size, o.x0, o.y0)]), prompt)
    assert not verdict.passed and verdict.reason.startswith("colour")


def test_reshaped_object_fails():
    prompt, objects = _scene("a magenta circle and a cyan triangle")
    o = objects[0]
    reshaped = [shapes.ShapeObject(o.color, 1, o.size, o.x0, o.y0), objects[1]]
    verdict = judge.judge(shapes.render(reshaped), prompt)
    assert not verdict.passed and verdict.reason.startswith("shape")


def test_misplaced_object_fails_the_relation():
    prompt, objects = _scene("a red circle left of a blue square")
    a, b = objects
    swapped = [
        shapes.ShapeObject(a.color, a.shape, a.size, b.x0, b.y0),
        shapes.ShapeObject(b.color, b.shape, b.size, a.x0, a.y0),
    ]
    if a.size != b.size:  # keep both boxes on the canvas: swap centres instead of corners
        swapped = [
            shapes.ShapeObject(a.color, a.shape, a.size, int(b.center[0] - a.size / 2), int(b.center[1] - a.size / 2)),
            shapes.ShapeObject(b.color, b.shape, b.size, int(a.center[0] - b.size / 2), int(a.center[1] - b.size / 2)),
        ]
    verdict = judge.judge(shapes.render(swapped), prompt)
    assert not verdict.passed and verdict.reason.startswith("relation")


def test_a_diagonal_pair_fails_the_relation_as_diagonal():
    prompt = shapes.parse_prompt("a red circle left of a blue square")
    left, right = shapes.ShapeObject(0, 0, 12, 4, 4), shapes.ShapeObject(2, 1, 12, 28, 28)  # 24 px right and 24 px down
    verdict = judge.judge(shapes.render([left, right]), prompt)
    assert not verdict.passed and verdict.reason == "diagonal: left of, but as far or further across"
    beside = shapes.ShapeObject(2, 1, 12, 28, 20)  # 24 px right, 16 px down: the rule holds
    assert judge.judge(shapes.render([left, beside]), prompt).passed


def test_wrong_size_fails_sized_and_count_prompts():
    prompt, objects = _scene("a small blue circle")
    o = objects[0]
    big = shapes.ShapeObject(o.color, o.shape, 24, min(o.x0, 38), min(o.y0, 38))
    assert judge.judge(shapes.render([big]), prompt).reason.startswith("size")


def test_small_colour_and_edge_errors_are_tolerated_but_blobs_are_not():
    prompt, objects = _scene("a green square", seed=5)
    image = shapes.render(objects).astype(np.int32)
    rng = np.random.default_rng(0)
    noisy = np.clip(image + rng.integers(-60, 61, image.shape), 0, 255).astype(np.uint8)
    noisy[0, 0] = (255, 0, 0)  # a stray pixel
    assert judge.judge(noisy, prompt).passed
    stretched = np.zeros((64, 64, 3), dtype=np.uint8)
    stretched[10:34, 10:22] = shapes.PALETTE[1]  # a green 12 x 24 rectangle is no square of either size
    verdict = judge.judge(stretched, prompt)
    assert not verdict.passed and verdict.reason.startswith("shape")


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert judge.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert judge.frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-3)


def _drawn(prompt: shapes.Prompt, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [shapes.render(shapes.sample_scene(prompt, rng)) for _ in range(count)]


def test_a_layout_is_what_the_scene_holds():
    objects = [shapes.ShapeObject(0, 0, 12, 4, 28), shapes.ShapeObject(2, 1, 24, 36, 4)]  # centres (10, 34), (48, 16)
    assert judge.layout(shapes.render(objects)) == {(0, 0, 12, 36), (2, 1, 48, 16)}
    moved = [objects[0], shapes.ShapeObject(2, 1, 24, 28, 4)]
    assert judge.layout(shapes.render(moved)) != judge.layout(shapes.render(objects))


def test_the_data_against_a_second_draw_of_the_data_covers_about_everything():
    prompts = judge.held_out_prompts(10, seed=5)
    first = [image for p in prompts for image in _drawn(p, 64, seed=1 + prompts.index(p))]
    second = [image for p in prompts for image in _drawn(p, 64, seed=100 + prompts.index(p))]
    coverage = judge.coverage(second, first, prompts)
    assert 0.85 < coverage.mean < 1.15 and coverage.minimum > 0.7
    assert coverage.commonest < 0.15 and coverage.data_commonest < 0.15
    assert set(coverage.per_kind) == set(shapes.KINDS)


def test_one_repeated_image_covers_one_layout_of_the_datas_distinct_ones():
    prompt = shapes.parse_prompt("a red circle and a blue square")
    data = _drawn(prompt, 64, seed=0)
    distinct = len({judge.layout(image) for image in data})
    found = judge.prompt_coverage([data[0]] * 64, data, prompt)
    assert (found.passed, found.distinct, found.commonest) == (64, 1, 64)
    assert found.coverage == pytest.approx(1 / distinct) and distinct > 30


def test_only_passing_images_count_towards_coverage():
    prompt = shapes.parse_prompt("two green triangles")
    data = _drawn(prompt, 8, seed=0)
    wrong = [
        shapes.render(shapes.sample_scene(shapes.parse_prompt("three green triangles"), np.random.default_rng(i)))
        for i in range(4)
    ]
    found = judge.prompt_coverage(data[:4] + wrong, data, prompt)
    assert (found.images, found.passed) == (8, 4)
    assert found.distinct == len({judge.layout(image) for image in data[:4]})


def test_coverage_needs_as_many_images_for_every_prompt():
    prompts = judge.held_out_prompts(3, seed=5)
    with pytest.raises(ValueError, match="do not split evenly"):
        judge.coverage([np.zeros((64, 64, 3), np.uint8)] * 7, [np.zeros((64, 64, 3), np.uint8)] * 7, prompts)
