"""The Shapes world: pixel rules, placement rules, grammar round trip and bad prompts."""

import re

import numpy as np
import pytest

from softdimo import shapes


def test_circle_pixels_follow_the_centre_rule():
    mask = shapes.shape_mask(0, 12)
    # Row 0 of a 12-px circle: centres at v = 0.5; inside when (u - 6)^2 <= 36 - 30.25 = 5.75,
    # so u in 3.5..8.5 -> x 4..7.
    assert mask[0].nonzero()[0].tolist() == [4, 5, 6, 7]
    assert mask[5].all()
    assert mask.sum() == 112
    assert (mask == mask.T).all() and (mask == mask[::-1]).all()


def test_triangle_has_apex_on_top_and_full_base():
    mask = shapes.shape_mask(2, 12)
    assert not mask[0].any()  # at v = 0.5 the half-width is 0.25: no pixel centre fits
    assert mask[1].nonzero()[0].tolist() == [5, 6]
    assert mask[-1].all()
    assert (mask == mask[:, ::-1]).all()
    assert shapes.shape_mask(2, 24).sum() == 288


def test_square_fills_its_box_and_render_uses_exact_palette_colours():
    obj = shapes.ShapeObject(color=3, shape=1, size=12, x0=10, y0=20)
    image = shapes.render([obj])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert (image[20:32, 10:22] == (255, 255, 0)).all()
    assert image.sum() == 12 * 12 * 510
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours == {(0, 0, 0), (255, 255, 0)}


@pytest.mark.parametrize("placement", shapes.PLACEMENTS)
def test_placement_keeps_margins_gaps_and_relations(placement):
    rng = np.random.default_rng(0)
    for _ in range(300):
        prompt = shapes.sample_prompt(rng)
        objects = shapes.sample_scene(prompt, rng, placement)
        for o in objects:
            assert o.x0 >= 2 and o.y0 >= 2 and o.x0 + o.size <= 62 and o.y0 + o.size <= 62
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                assert shapes.box_gap(a, b) >= 2
        if prompt.kind == "relation":
            assert shapes.relation_holds(objects[0].center, objects[1].center, prompt.relation)
        if prompt.kind == "count":
            assert len(objects) == prompt.count and all(o.size == 12 for o in objects)
        if prompt.kind == "sized":
            assert objects[0].size == prompt.objects[0].size


def test_grid_placement_puts_every_box_corner_on_the_grid():
    rng = np.random.default_rng(3)
    corners = set()
    for _ in range(500):
        for o in shapes.sample(rng).objects:
            corners |= {o.x0, o.y0}
    assert corners == {4, 12, 20, 28, 36, 44}  # 4 + 8k, every one of them reached (44 by small boxes only)


def test_free_placement_reaches_corners_off_the_grid():
    rng = np.random.default_rng(3)
    corners = {c for _ in range(200) for o in shapes.sample(rng, placement="free").objects for c in (o.x0, o.y0)}
    assert corners - {4, 12, 20, 28, 36, 44}


LARGE = shapes.SIZES["large"]


@pytest.mark.parametrize("placement", shapes.PLACEMENTS)
@pytest.mark.parametrize(
    "prompt",
    [
        shapes.Prompt(kind, (shapes.ObjectSpec(0, 0, LARGE), shapes.ObjectSpec(2, 1, LARGE)), relation=relation)
        for kind, relation in [("pair", None), *(("relation", r) for r in shapes.RELATIONS)]
    ]
    + [shapes.parse_prompt("three red circles"), shapes.parse_prompt("a large green triangle")],
    ids=lambda p: f"{p.kind}-{p.relation}",
)
def test_every_kind_is_drawable_even_with_two_large_objects(prompt, placement):
    rng = np.random.default_rng(0)
    for _ in range(20):
        objects = shapes.sample_scene(prompt, rng, placement)  # terminates: the placements exist
        wanted = [s.size for s in prompt.objects] if prompt.kind != "count" else [shapes.SIZES["small"]] * prompt.count
        assert [o.size for o in objects] == wanted


def test_a_large_box_never_starts_where_it_would_cross_the_margin():
    assert shapes.corner_positions(24).tolist() == [4, 12, 20, 28, 36]
    assert shapes.corner_positions(12).tolist() == [4, 12, 20, 28, 36, 44]
    with pytest.raises(ValueError, match="unknown placement"):
        shapes.corner_positions(12, "hex")


def test_a_relation_contrasts_with_its_perpendicular_relations_and_other_kinds_with_none():
    relation = shapes.parse_prompt("a red circle left of a blue square")
    contrasts = [p.text() for p in shapes.contrast_prompts(relation)]
    assert contrasts == ["a red circle above a blue square", "a red circle below a blue square"]
    for other in ["a red circle", "a large red circle", "a red circle and a blue square", "two red circles"]:
        assert shapes.contrast_prompts(shapes.parse_prompt(other)) == ()


def test_relation_rule_matches_the_spec():
    assert shapes.relation_holds((10, 30), (26, 30), "left of")
    assert not shapes.relation_holds((10, 30), (25, 30), "left of")  # 15 px is not enough
    assert not shapes.relation_holds((10, 10), (30, 31), "left of")  # the other axis differs more
    assert shapes.relation_holds((30, 40), (30, 20), "below")


def test_every_kind_round_trips_through_the_parser():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(500):
        prompt = shapes.sample_prompt(rng)
        assert shapes.parse_prompt(prompt.text()) == prompt
        seen.add(prompt.kind)
    assert seen == set(shapes.KINDS)
    assert shapes.parse_prompt("three cyan triangles") == shapes.Prompt("count", (shapes.ObjectSpec(5, 2),), count=3)
    assert shapes.parse_prompt("a large red circle").objects[0].size == 24


@pytest.mark.parametrize(
    "text",
    [
        "a purple circle",
        "A red circle",
        "a red  circle",
        "a red circle.",
        "four red circles",
        "a red circle and a red circle",
        "a red circle left a blue square",
        "",
        "two red circle",
    ],
)
def test_prompts_outside_the_grammar_are_refused_with_the_vocabulary(text):
    with pytest.raises(shapes.PromptError) as info:
        shapes.parse_prompt(text)
    assert repr(text) in str(info.value)  # the message quotes the prompt
    assert "colors: red, green" in str(info.value) or "must differ" in str(info.value)


def _parses(text: str) -> bool:
    try:
        shapes.parse_prompt(text)
    except shapes.PromptError:
        return False
    return True


def test_the_prompt_pattern_matches_exactly_what_the_parser_accepts():
    pattern = re.compile(shapes.prompt_pattern())
    language = [prompt.text() for prompt in shapes.every_prompt()]  # built from the grammar's parts, not the pattern
    assert len(set(language)) == 18 + 36 + 36 + 306 + 1224
    assert all(pattern.fullmatch(text) and _parses(text) for text in language)
    # Near misses: each prompt with one word replaced, dropped or doubled, and the identical pairs the grammar refuses.
    rng = np.random.default_rng(0)
    words = list(shapes.VOCABULARY) + ["purple", "A", ""]
    misses = [f"a {o} and a {o}" for o in ("red circle", "cyan triangle")] + ["a red circle left of a red circle"]
    for text in language:
        w = text.split(" ")
        i = int(rng.integers(len(w)))
        misses += [
            " ".join(w[:i] + [words[rng.integers(len(words))]] + w[i + 1 :]),
            " ".join(w[:i] + w[i + 1 :]),
            " ".join(w[: i + 1] + w[i:]),
            text + "\n",
            " " + text,
        ]
    for text in misses:
        assert bool(pattern.fullmatch(text)) == _parses(text), text
    assert sum(map(_parses, misses)) > 100  # some replacements land on other prompts: both sides were tested


def test_unknown_words_are_named():
    with pytest.raises(shapes.PromptError, match=r"unknown words \['purple'\]"):
        shapes.parse_prompt("a purple circle")


def test_class_labels_follow_the_spec():
    assert shapes.class_label(0, 0) == 0 and shapes.class_label(5, 2) == 17
    assert shapes.class_name(1) == "red square"
    with pytest.raises(shapes.PromptError):
        shapes.class_prompt(18)


def test_prompts_render_in_order_from_one_generator():
    prompts = [
        shapes.parse_prompt(t) for t in ("a red circle", "two blue squares", "a green triangle above a red circle")
    ]
    images = shapes.render_prompts(prompts, np.random.default_rng(5), "free")
    rng = np.random.default_rng(5)
    for prompt, image in zip(prompts, images, strict=True):
        assert (image == shapes.render(shapes.sample_scene(prompt, rng, "free"))).all()
    # one generator for all: the second image is not the one a fresh generator would draw for its prompt
    assert not (images[1] == shapes.render_prompts(prompts[1:2], np.random.default_rng(5), "free")[0]).all()


def test_stream_is_seeded():
    a, b = shapes.stream(7), shapes.stream(7)
    for _ in range(5):
        x, y = next(a), next(b)
        assert x.prompt == y.prompt and (x.image == y.image).all()
    other = [next(shapes.stream(8)).image.tobytes() for _ in range(1)]
    assert other[0] != next(shapes.stream(7)).image.tobytes()


def test_weighted_kinds_draw_each_kind_as_often_as_its_weight_says():
    kinds = shapes.weighted_kinds(shapes.KINDS, (1, 1, 2, 2, 2))
    assert kinds == ("single", "sized", "pair", "pair", "count", "count", "relation", "relation")
    assert shapes.weighted_kinds(shapes.KINDS) == shapes.KINDS
    rng = np.random.default_rng(0)
    drawn = [shapes.sample_prompt(rng, kinds).kind for _ in range(4000)]
    assert 0.10 < drawn.count("single") / 4000 < 0.15 and 0.22 < drawn.count("count") / 4000 < 0.28
    for weights in ((1, 2), (1, 1, 0, 1, 1), (1, 1, 1.5, 1, 1)):
        with pytest.raises(ValueError, match="one whole weight"):
            shapes.weighted_kinds(shapes.KINDS, weights)
