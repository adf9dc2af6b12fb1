"""Edit evaluation: held-out inpainting edits (one object kept, a second asked for in the free half of the canvas)
and image-to-image inputs, edited by a model and judged: the prompt's pass rate, the kept object unchanged, and
layout coverage across seeds."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from softdimo import judge, shapes
from softdimo.editing import DEFAULT_STRENGTH, repaint_at_strength, repaint_from_mask
from softdimo.evaluation import COVERAGE_PROMPTS, HELD_OUT_SEED, EvaluationError, coverage_dict, real_images
from softdimo.tables import markdown_table

EDITS = 300  # held-out inpainting edits, and image-to-image inputs, an evaluation judges

HALF = shapes.CANVAS // 2
HALVES = ("left", "right", "top", "bottom")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# The relation that reads "kept object <relation> new object" when the kept object is in this half and the new one
# in the opposite, free half.
RELATION_FROM = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}


def half_mask(half: str) -> np.ndarray:
    """(64, 64) bool, True over one half of the canvas."""
    mask = np.zeros((shapes.CANVAS, shapes.CANVAS), dtype=bool)
    rows, columns = {
        "left": (slice(None), slice(None, HALF)),
        "right": (slice(None), slice(HALF, None)),
        "top": (slice(None, HALF), slice(None)),
        "bottom": (slice(HALF, None), slice(None)),
    }[half]
    mask[rows, columns] = True
    return mask


def within_half(obj: shapes.ShapeObject, half: str) -> bool:
    """Whether an object's whole box lies in a half of the canvas."""
    return {
        "left": obj.x0 + obj.size <= HALF,
        "right": obj.x0 >= HALF,
        "top": obj.y0 + obj.size <= HALF,
        "bottom": obj.y0 >= HALF,
    }[half]


@dataclass(frozen=True)
class InpaintingEdit:
    """One held-out inpainting edit: a world scene of one object, the mask over the half of the canvas that does not
    hold it, and a prompt asking for that object and a second one in the relation the free half allows."""

    image: np.ndarray  # (64, 64, 3) uint8: the scene of `kept` alone
    mask: np.ndarray  # (64, 64) bool: True over `free_half`, where the model repaints
    prompt: shapes.Prompt  # "a {kept} {relation} a {new}"
    kept: shapes.ShapeObject
    free_half: str
    solution: tuple[shapes.ShapeObject, shapes.ShapeObject]  # `kept` and a new object in the free half that answer it


def new_object_places(kept: shapes.ShapeObject, free_half: str, relation: str) -> list[tuple[int, int, int]]:
    """Every (side, x0, y0) on the placement grid where a second object lies in `free_half`, apart from `kept`, and
    `kept` stands in `relation` to it."""
    places = []
    for side in shapes.SIZES.values():
        corners = shapes.corner_positions(side)
        for y0 in corners:
            for x0 in corners:
                new = shapes.ShapeObject(0, 0, side, int(x0), int(y0))
                if (
                    within_half(new, free_half)
                    and shapes.box_gap(kept, new) >= shapes.GAP
                    and shapes.relation_holds(kept.center, new.center, relation)
                ):
                    places.append((side, int(x0), int(y0)))
    return places


def draw_edit(rng: np.random.Generator) -> InpaintingEdit:
    """One edit from `rng`: a single-object prompt's scene, drawn again until its object lies wholly in a half (and a
    second object has room in the other); the kept half at random among those that hold it; the new object's colour
    and shape at random, differing from the kept one's, as the grammar asks of a relation's two objects."""
    while True:
        (kept,) = shapes.sample_scene(shapes.sample_prompt(rng, kinds=("single",)), rng)
        halves = [h for h in HALVES if within_half(kept, h)]
        if not halves:
            continue
        kept_half = halves[rng.integers(len(halves))]
        relation, free_half = RELATION_FROM[kept_half], OPPOSITE[kept_half]
        places = new_object_places(kept, free_half, relation)
        if places:
            break
    kept_spec = shapes.ObjectSpec(kept.color, kept.shape)
    new_spec = kept_spec
    while new_spec == kept_spec:
        new_spec = shapes.ObjectSpec(int(rng.integers(len(shapes.COLORS))), int(rng.integers(len(shapes.SHAPES))))
    side, x0, y0 = places[rng.integers(len(places))]
    new = shapes.ShapeObject(new_spec.color, new_spec.shape, side, x0, y0)
    return InpaintingEdit(
        image=shapes.render([kept]),
        mask=half_mask(free_half),
        prompt=shapes.Prompt("relation", (kept_spec, new_spec), relation=relation),
        kept=kept,
        free_half=free_half,
        solution=(kept, new),
    )


def held_out_edits(count: int, seed: int = HELD_OUT_SEED) -> list[InpaintingEdit]:
    """A fixed set of `count` edits drawn from `seed`, one no training run draws from."""
    rng = np.random.default_rng(seed)
    return [draw_edit(rng) for _ in range(count)]


@dataclass(frozen=True)
class EditScore:
    """An edited image read against its edit: the prompt passes, and the kept object is still there as it was."""

    passed: bool
    kept: bool
    reason: str  # the judge's: "ok" or what failed

    @property
    def both(self) -> bool:
        return self.passed and self.kept


def kept_unchanged(objects: Sequence[judge.DetectedObject], kept: shapes.ShapeObject) -> bool:
    """Whether the judge reads, among `objects`, the kept object with its colour, shape, side and box corner, and in
    a shape it fits as well as the judge asks of any object.

    Not the kept half's pixels: the patches next to repainted tokens show the decoder's pixels (editing.BLEND_REACH),
    and a small object on the half's edge reaches into them."""
    return any(
        (o.color, o.shape, o.size, o.x0, o.y0) == (kept.color, kept.shape, kept.size, kept.x0, kept.y0)
        and o.iou >= judge.MIN_FIT_IOU
        for o in objects
    )


def score_edit(result: np.ndarray, edit: InpaintingEdit) -> EditScore:
    objects, stray = judge.detect(result)
    verdict = judge.verdict(objects, stray, edit.prompt)
    return EditScore(passed=verdict.passed, kept=kept_unchanged(objects, edit.kept), reason=verdict.reason)


# ---------------------------------------------------------------- running a model's edits


def _conditions(pipeline, prompts: Sequence[shapes.Prompt]) -> tuple[torch.Tensor, list[str]]:
    conditions, texts = zip(*(pipeline.conditioner.for_prompt(p) for p in prompts))
    return torch.cat(conditions), list(texts)


def edit_images(
    pipeline,
    images: np.ndarray,
    repaint: torch.Tensor,
    prompts: Sequence[shapes.Prompt],
    seeds: Sequence[int],
    batch: int = 50,
) -> list[np.ndarray]:
    """Each image (B, H, W, 3) edited for its prompt at its seed, its tokens `repaint` (B, N) drawn anew."""
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        condition, _ = _conditions(pipeline, prompts[i : i + batch])
        part = slice(i, i + batch)
        out.extend(pipeline.edit(images[part], repaint[part], condition, list(seeds[part])))
    return out


def refined_edit_images(
    pipeline,
    images: np.ndarray,
    repaint: torch.Tensor,
    prompts: Sequence[shapes.Prompt],
    seeds: Sequence[int],
    steps: int,
    batch: int = 50,
) -> list[np.ndarray]:
    """`edit_images` refined by TTEO for `steps` at the bundle's other TTEO settings, one candidate an image, with its
    default reward."""
    from softdimo.tteo import candidate_seeds
    from softdimo.vq import to_uint8

    settings = replace(pipeline.tteo, steps=steps, best_of=1)
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        condition, texts = _conditions(pipeline, prompts[i : i + batch])
        part = slice(i, i + batch)
        candidates = candidate_seeds(list(seeds[part]), 1)
        refined = pipeline.refine_edit(images[part], repaint[part], condition, texts, candidates, settings)
        out.extend(to_uint8(refined.images))
    return out


# ---------------------------------------------------------------- rows and tables


@dataclass
class InpaintingRow:
    """One way of making the edits: the shares of edits that pass the prompt, keep the kept object, and do both."""

    name: str
    scores: list[EditScore] = field(repr=False)
    seconds: float = 0.0

    def share(self, of: str) -> float:
        return float(np.mean([getattr(s, of) for s in self.scores]))

    def failures(self) -> dict[str, int]:
        """How many edits fail the prompt, by the judge's failure category."""
        return dict(Counter(s.reason.split(":")[0] for s in self.scores if not s.passed))

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "edits": len(self.scores),
            "pass": round(self.share("passed"), 4),
            "kept_unchanged": round(self.share("kept"), 4),
            "both": round(self.share("both"), 4),
            "failures": self.failures(),
            "seconds": round(self.seconds, 1),
        }


@dataclass
class ImageToImageRow:
    """One way of drawing images for held-out prompts (edited from their world scenes, or not): pass rates, and
    layout coverage across seeds."""

    name: str
    rates: judge.PassRates
    coverage: judge.Coverage | None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "prompts": sum(self.rates.counts.values()),
            "pass": round(self.rates.overall, 4),
            "per_kind": {k: round(v, 4) for k, v in self.rates.per_kind.items()},
            "failures": self.rates.failures,
            "seconds": round(self.seconds, 1),
            **({"coverage": coverage_dict(self.coverage)} if self.coverage else {}),
        }


def _ms(seconds: float, count: int) -> str | None:
    return f"{1000 * seconds / count:.1f}" if seconds else None


@dataclass
class EditTables:
    """One model's edit evaluation: inpainting rows (none for a model whose prompts cannot ask for a relation) and
    image-to-image rows, with the command that made them."""

    model: str
    command: str
    strength: float
    inpainting: list[InpaintingRow]
    image_to_image: list[ImageToImageRow]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"`{self.command}`"]
        if self.inpainting:
            parts.append(
                markdown_table(
                    ["inpainting the free half", "edits", "pass", "kept unchanged", "both", "ms / edit"],
                    [
                        [
                            r.name,
                            len(r.scores),
                            f"{r.share('passed'):.3f}",
                            f"{r.share('kept'):.3f}",
                            f"**{r.share('both'):.3f}**",
                            _ms(r.seconds, len(r.scores)),
                        ]
                        for r in self.inpainting
                    ],
                )
            )
        parts.append(
            markdown_table(
                [
                    f"image-to-image, strength {self.strength:g}",
                    "prompts",
                    "pass",
                    "coverage",
                    "min",
                    "commonest",
                    "ms / image",
                ],
                [
                    [
                        r.name,
                        sum(r.rates.counts.values()),
                        f"**{r.rates.overall:.3f}**",
                        *(
                            [f"{r.coverage.mean:.2f}", f"{r.coverage.minimum:.2f}", f"{r.coverage.commonest:.2f}"]
                            if r.coverage
                            else [None] * 3
                        ),
                        _ms(r.seconds, sum(r.rates.counts.values())),
                    ]
                    for r in self.image_to_image
                ],
            )
        )
        return "\n\n".join([*parts, *self.notes])

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "command": self.command,
            "strength": self.strength,
            "inpainting": [r.as_dict() for r in self.inpainting],
            "image_to_image": [r.as_dict() for r in self.image_to_image],
            "notes": self.notes,
        }


def inpainting_rows(
    pipeline, name: str, edits: Sequence[InpaintingEdit], tteo_steps: Sequence[int]
) -> list[InpaintingRow]:
    """The model's edits in its own way (one step, or a teacher's steps), with TTEO at each of `tteo_steps`, and the
    edits' solutions (each a world scene that answers its prompt) as the reference."""
    from softdimo.pipeline import OneStepPipeline

    images = np.stack([e.image for e in edits])
    repaint = repaint_from_mask(np.stack([e.mask for e in edits]), pipeline.tokenizer.cfg.grid)
    prompts = [e.prompt for e in edits]
    seeds = list(range(len(edits)))

    def row(label: str, make) -> InpaintingRow:
        start = time.perf_counter()
        results = make()
        seconds = time.perf_counter() - start
        return InpaintingRow(label, [score_edit(r, e) for r, e in zip(results, edits, strict=True)], seconds)

    way = "1 step" if isinstance(pipeline, OneStepPipeline) else f"{pipeline.sampler.steps} steps"
    rows = [row(f"{name} ({way})", lambda: edit_images(pipeline, images, repaint, prompts, seeds))]
    for k in tteo_steps:
        rows.append(
            row(f"{name} + TTEO {k}", lambda k=k: refined_edit_images(pipeline, images, repaint, prompts, seeds, k))
        )
    solutions = InpaintingRow("solutions (reference)", [score_edit(shapes.render(e.solution), e) for e in edits])
    return [*rows, solutions]


def image_to_image_rows(
    pipeline, name: str, *, prompts: int, strength: float, coverage_prompts: int, coverage_seeds: int
) -> list[ImageToImageRow]:
    """Held-out prompts' world scenes edited at `strength` for their own prompt (prompt i at seed i), beside the model
    drawing the same prompts from nothing and the scenes themselves left as they are; layout coverage of the first
    `coverage_prompts`, each one scene edited (or drawn) at seeds 0 .. `coverage_seeds` - 1, against as many of the
    world's scenes of the prompt."""
    held_out = judge.held_out_prompts(prompts, seed=HELD_OUT_SEED, kinds=pipeline.conditioner.kinds)
    inputs = np.stack(real_images(held_out))
    tokens = pipeline.tokenizer.cfg.grid**2
    covered = held_out[:coverage_prompts]
    repeated = [p for p in covered for _ in range(coverage_seeds)]  # each coverage prompt's run of seeds
    repeated_inputs = np.repeat(inputs[: len(covered)], coverage_seeds, axis=0)
    repeated_seeds = list(range(coverage_seeds)) * len(covered)
    data = real_images(repeated)

    def edited(images: np.ndarray, prompts: list[shapes.Prompt], seeds: list[int]) -> list[np.ndarray]:
        return edit_images(pipeline, images, repaint_at_strength(seeds, strength, tokens), prompts, seeds)

    def row(label: str, make) -> ImageToImageRow:
        start = time.perf_counter()
        images = make(inputs, held_out, list(range(len(held_out))))
        seconds = time.perf_counter() - start
        again = make(repeated_inputs, repeated, repeated_seeds) if repeated else []
        return ImageToImageRow(
            name=label,
            rates=judge.pass_rates(images, held_out),
            coverage=judge.coverage(again, data, covered) if repeated else None,
            seconds=seconds,
        )

    return [
        row(f"{name} image-to-image", edited),
        row(f"{name} drawn without an input", lambda images, p, s: pipeline.generate_prompts(p, s)),
        ImageToImageRow(
            "inputs as they are (reference)",
            rates=judge.pass_rates(list(inputs), held_out),
            coverage=judge.coverage(list(repeated_inputs), data, covered) if repeated else None,
        ),
    ]


def evaluate_edits(
    path,
    *,
    command: str,
    edits: int = EDITS,
    tteo_steps: Sequence[int] = (),
    strength: float = DEFAULT_STRENGTH,
    coverage_prompts: int = COVERAGE_PROMPTS,
    coverage_seeds: int = judge.COVERAGE_SEEDS,
    device="cpu",
) -> EditTables:
    """A bundle's edit evaluation: `edits` held-out inpainting edits, in its own way and with TTEO at each of
    `tteo_steps` (one-step models with a reward); image-to-image at `strength` on as many held-out prompts' scenes."""
    from softdimo.bundle import read_bundle
    from softdimo.pipeline import OneStepPipeline, load_pipeline

    if edits < 1:
        raise EvaluationError(f"an edit evaluation needs at least one edit, got {edits}")
    if not 0 < strength <= 1:
        raise EvaluationError(f"image-to-image strength is in (0, 1]: the share of tokens repainted, got {strength}")
    bundle = read_bundle(path)
    if bundle.config.get("kind") not in ("one-step", "masked-diffusion"):
        raise EvaluationError(f"{path}: a {bundle.config.get('kind')} bundle draws no images to edit")
    pipeline = load_pipeline(bundle, device)
    if not hasattr(pipeline, "edit"):
        raise EvaluationError(f"{path}: this model does not edit images")
    name = bundle.config["name"]
    notes: list[str] = []
    inpainting: list[InpaintingRow] = []
    if "relation" not in pipeline.conditioner.kinds:
        notes.append(
            f"{name} takes no relation prompts (its kinds: {', '.join(pipeline.conditioner.kinds)}), so no inpainting "
            "edit, which asks for the kept object in a relation to a new one, can be put to it: image-to-image only."
        )
    else:
        if tteo_steps and not (isinstance(pipeline, OneStepPipeline) and pipeline.rewards):
            notes.append(f"{name} is not a one-step model with a reward: no TTEO rows.")
            tteo_steps = ()
        inpainting = inpainting_rows(pipeline, name, held_out_edits(edits), tteo_steps)
    rows = image_to_image_rows(
        pipeline,
        name,
        prompts=edits,
        strength=strength,
        coverage_prompts=coverage_prompts,
        coverage_seeds=coverage_seeds,
    )
    return EditTables(
        model=name, command=command, strength=strength, inpainting=inpainting, image_to_image=rows, notes=notes
    )
