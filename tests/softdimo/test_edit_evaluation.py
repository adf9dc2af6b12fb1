"""The edit evaluation: held-out inpainting edits that a model can answer, scored for the prompt and the kept object;
`softdimo eval-edits` end to end."""

import json

import numpy as np
import pytest

from softdimo import edit_evaluation, judge, shapes
from softdimo.cli import main
from softdimo.edit_evaluation import EditScore, InpaintingEdit, held_out_edits, score_edit


Y, X = np.mgrid[0:64, 0:64]
HALVES = {"left": X < 32, "right": X >= 32, "top": Y < 32, "bottom": Y >= 32}


def test_the_edit_set_is_the_same_every_time_and_its_own_for_a_seed():
    first, again, other = held_out_edits(40), held_out_edits(40), held_out_edits(40, seed=1)

    def described(edits):
        return [(e.prompt, e.kept, e.free_half, e.solution, e.image.tobytes(), e.mask.tobytes()) for e in edits]

    assert described(first) == described(again)
    assert described(first) != described(other)
    assert described(held_out_edits(10)) == described(first[:10])


def test_each_edit_keeps_its_object_in_one_half_masks_the_other_and_asks_what_that_half_allows():
    edits = held_out_edits(200)
    assert {e.free_half for e in edits} == {"left", "right", "top", "bottom"}
    assert {e.kept.size for e in edits} == set(shapes.SIZES.values())
    for e in edits:
        assert np.array_equal(e.image, shapes.render([e.kept]))
        # the mask is exactly the free half: every pixel on that side of the middle, none on the other
        assert np.array_equal(e.mask, HALVES[e.free_half])
        k = e.kept
        assert not e.mask[k.y0 : k.y0 + k.size, k.x0 : k.x0 + k.size].any()  # the kept object wholly in the kept half
        # the prompt: the kept object, then a different one, in a relation that a scene with the new object in the
        # free half satisfies
        assert e.prompt.kind == "relation" and shapes.parse_prompt(e.prompt.text()) == e.prompt
        first, second = e.prompt.objects
        kept, new = e.solution
        assert kept == e.kept and (first.color, first.shape) == (k.color, k.shape) and first != second
        assert (new.color, new.shape) == (second.color, second.shape)
        assert e.mask[new.y0 : new.y0 + new.size, new.x0 : new.x0 + new.size].all()
        assert shapes.relation_holds(kept.center, new.center, e.prompt.relation)
        assert shapes.box_gap(kept, new) >= shapes.GAP
        assert score_edit(shapes.render(e.solution), e) == EditScore(passed=True, kept=True, reason="ok")


@pytest.fixture
def small_square_on_the_left() -> InpaintingEdit:
    """A red square at the right edge of the left half (in the patches next to the repainted ones), a blue circle
    asked for to its right."""
    kept = shapes.ShapeObject(0, 1, 12, 20, 28)
    new = shapes.ShapeObject(2, 0, 12, 44, 28)
    return InpaintingEdit(
        image=shapes.render([kept]),
        mask=edit_evaluation.half_mask("right"),
        prompt=shapes.parse_prompt("a red square left of a blue circle"),
        kept=kept,
        free_half="right",
        solution=(kept, new),
    )


def test_a_moved_or_damaged_kept_object_is_not_unchanged(small_square_on_the_left):
    edit = small_square_on_the_left
    kept, new = edit.solution
    assert score_edit(shapes.render([kept, new]), edit).both
    # nothing added: the kept object is there, the prompt fails
    assert score_edit(edit.image, edit) == EditScore(passed=False, kept=True, reason="count: 1 objects, wanted 2")
    # moved one grid step to the left: the prompt still passes, but the kept object is not where it was
    moved = shapes.render([shapes.ShapeObject(0, 1, 12, 12, 28), new])
    assert score_edit(moved, edit) == EditScore(passed=True, kept=False, reason="ok")
    # recoloured, or drawn large: neither the same object
    for changed in (shapes.ShapeObject(3, 1, 12, 20, 28), shapes.ShapeObject(0, 1, 24, 4, 20)):
        assert not score_edit(shapes.render([changed, new]), edit).kept
    # its right edge blacked out, where the decoder paints next to the repainted half: read elsewhere, misshaped
    cut = shapes.render([kept, new])
    cut[:, 30:32] = 0
    misshaped = "shape: an object fits no shape (best IoU 0.83)"
    assert score_edit(cut, edit) == EditScore(passed=False, kept=False, reason=misshaped)
    # a hole in its middle: read with the same box, but in a shape the judge would not pass
    holed = shapes.render([kept, new])
    holed[31:37, 23:29] = 0
    objects, _ = judge.detect(holed)
    assert [(o.color, o.shape, o.size, o.x0, o.y0) for o in objects if o.color == 0] == [(0, 1, 12, 20, 28)]
    assert not score_edit(holed, edit).kept


def test_eval_edits_prints_and_writes_every_row(tiny_bundles, tmp_path, capsys, one_thread):
    out = tmp_path / "edits.json"
    args = [
        "eval-edits",
        str(tiny_bundles["one-step"]),
        "--edits",
        "6",
        "--tteo-steps",
        "2",
        "--coverage-prompts",
        "2",
        "--coverage-seeds",
        "3",
        "--json",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    command = (
        f"softdimo eval-edits {tiny_bundles['one-step']} --edits 6 --tteo-steps 2 --strength 0.5 "
        "--coverage-prompts 2 --coverage-seeds 3 --device cpu"
    )
    assert f"`{command}`" in printed
    assert "| inpainting the free half | edits | pass | kept unchanged | both | ms / edit |" in printed
    assert "| image-to-image, strength 0.5 | prompts | pass | coverage | min | commonest | ms / image |" in printed
    result = json.loads(out.read_text())
    assert result["command"] == command and result["strength"] == 0.5
    inpainting = {row["name"]: row for row in result["inpainting"]}
    assert list(inpainting) == ["tiny-one-step (1 step)", "tiny-one-step + TTEO 2", "solutions (reference)"]
    assert all(row["edits"] == 6 for row in inpainting.values())
    reference = inpainting["solutions (reference)"]
    assert (reference["pass"], reference["kept_unchanged"], reference["both"]) == (1.0, 1.0, 1.0)
    image_to_image = {row["name"]: row for row in result["image_to_image"]}
    assert list(image_to_image) == [
        "tiny-one-step image-to-image",
        "tiny-one-step drawn without an input",
        "inputs as they are (reference)",
    ]
    assert all(row["prompts"] == 6 and row["coverage"]["prompts"] == 2 for row in image_to_image.values())
    inputs = image_to_image["inputs as they are (reference)"]
    assert inputs["pass"] == 1.0 and inputs["coverage"]["commonest"] == 1.0  # one input: one layout at every seed


def test_eval_edits_scores_what_the_model_draws(tiny_bundles, one_thread):
    from softdimo.editing import repaint_from_mask
    from softdimo.pipeline import load_pipeline

    pipeline = load_pipeline(tiny_bundles["one-step"])
    edits = held_out_edits(4)
    repaint = repaint_from_mask(np.stack([e.mask for e in edits]), grid=8)
    drawn = edit_evaluation.edit_images(
        pipeline, np.stack([e.image for e in edits]), repaint, [e.prompt for e in edits], [0, 1, 2, 3]
    )
    rows = edit_evaluation.inpainting_rows(pipeline, "tiny", edits, tteo_steps=())
    assert rows[0].scores == [score_edit(image, e) for image, e in zip(drawn, edits)]
    for image, e in zip(drawn, edits):  # kept pixels away from the repainted half are the input's
        free = HALVES[e.free_half]
        far = ~free & ~np.roll(
            free, 8 if e.free_half in ("left", "top") else -8, axis=1 if e.free_half in ("left", "right") else 0
        )
        assert np.array_equal(image[far], e.image[far])


def test_a_class_model_gets_image_to_image_only(tiny_bundles, tmp_path, capsys, one_thread):
    out = tmp_path / "edits.json"
    args = [
        "eval-edits",
        str(tiny_bundles["one-step-class"]),
        "--edits",
        "3",
        "--coverage-prompts",
        "1",
        "--coverage-seeds",
        "2",
        "--json",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["command"] == (  # no TTEO steps asked for: none in the command
        f"softdimo eval-edits {tiny_bundles['one-step-class']} --edits 3 --strength 0.5 --coverage-prompts 1 "
        "--coverage-seeds 2 --device cpu"
    )
    assert result["inpainting"] == [] and len(result["image_to_image"]) == 3
    assert "takes no relation prompts" in result["notes"][0]
    assert "inpainting the free half" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "bundle,options,message",
    [
        ("tokenizer", [], "draws no images to edit"),
        ("one-step", ["--strength", "1.5"], "strength is in (0, 1]"),
        ("one-step", ["--strength", "0"], "strength is in (0, 1]"),
        ("one-step", ["--edits", "0"], "at least one edit"),
    ],
)
def test_eval_edits_refuses_what_it_cannot_run(tiny_bundles, capsys, bundle, options, message):
    assert main(["eval-edits", str(tiny_bundles[bundle]), *options, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
