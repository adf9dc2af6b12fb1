"""The Shapes world: palette, shapes, pixel-exact renderer, prompt grammar and a seeded dataset."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np

CANVAS = 64
MARGIN = 2  # every box keeps this many background pixels to the canvas edge
GAP = 2  # Chebyshev gap between the boxes of two objects
RELATION_MIN_OFFSET = 16  # centres differ by at least this along a relation's axis
GRID_OFFSET, GRID_STEP = 4, 8  # on the placement grid a box's corner is at GRID_OFFSET + GRID_STEP * k
PLACEMENTS = ("grid", "free")  # the world's two variants: corners on the grid (the default), or anywhere

COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
PALETTE = np.array(
    [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)],
    dtype=np.uint8,
)
SHAPES = ("circle", "square", "triangle")
PLURALS = ("circles", "squares", "triangles")
SIZES = {"small": 12, "large": 24}
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "sized", "pair", "count", "relation")
COUNT_WORDS = {"two": 2, "three": 3}
NUM_CLASSES = len(COLORS) * len(SHAPES)

VOCABULARY = tuple(
    sorted(
        {"a", "and", "of"}
        | set(COLORS)
        | set(SHAPES)
        | set(PLURALS)
        | set(SIZES)
        | set(COUNT_WORDS)
        | {w for r in RELATIONS for w in r.split()}
    )
)


class PromptError(ValueError):
    """A prompt that the Shapes grammar does not produce."""


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt asks of one object; `size` is a side in pixels or None for any size."""

    color: int
    shape: int
    size: int | None = None

    def words(self) -> str:
        size = "" if self.size is None else f"{_size_name(self.size)} "
        return f"{size}{COLORS[self.color]} {SHAPES[self.shape]}"


@dataclass(frozen=True)
class Prompt:
    """A parsed prompt: its kind, the objects it names, a count and a relation where the kind has them."""

    kind: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None

    def text(self) -> str:
        a = self.objects[0]
        if self.kind in ("single", "sized"):
            return f"a {a.words()}"
        if self.kind == "count":
            word = next(w for w, n in COUNT_WORDS.items() if n == self.count)
            return f"{word} {COLORS[a.color]} {PLURALS[a.shape]}"
        b = self.objects[1]
        joiner = "and" if self.kind == "pair" else self.relation
        return f"a {a.words()} {joiner} a {b.words()}"


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: colour and shape indices, box side and the box's top-left pixel."""

    color: int
    shape: int
    size: int
    x0: int
    y0: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.size / 2, self.y0 + self.size / 2)


def _size_name(side: int) -> str:
    return next(name for name, s in SIZES.items() if s == side)


def class_label(color: int, shape: int) -> int:
    return len(SHAPES) * color + shape


def class_name(label: int) -> str:
    color, shape = divmod(label, len(SHAPES))
    return f"{COLORS[color]} {SHAPES[shape]}"


def class_prompt(label: int) -> Prompt:
    """The prompt whose images a class-conditional model draws for `label`."""
    if not 0 <= label < NUM_CLASSES:
        raise PromptError(f"class label must be in 0..{NUM_CLASSES - 1}, got {label}")
    color, shape = divmod(label, len(SHAPES))
    return Prompt(kind="single", objects=(ObjectSpec(color, shape),))


# ---------------------------------------------------------------- rendering


@lru_cache(maxsize=None)
def shape_mask(shape: int, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape: a pixel belongs when its centre lies inside."""
    centres = np.arange(side) + 0.5
    u = centres[None, :]  # x within the box, along columns
    v = centres[:, None]  # y within the box, along rows
    if shape == 0:
        mask = (u - side / 2) ** 2 + (v - side / 2) ** 2 <= (side / 2) ** 2
    elif shape == 1:
        mask = np.ones((side, side), dtype=bool)
    elif shape == 2:
        mask = np.abs(u - side / 2) <= v / 2
    else:
        raise ValueError(f"unknown shape index {shape}")
    mask = np.broadcast_to(mask, (side, side)).copy()
    mask.setflags(write=False)
    return mask


def render(objects: Sequence[ShapeObject]) -> np.ndarray:
    """Draw objects on a black canvas: (64, 64, 3) uint8, exact to the spec's pixel rules."""
    image = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
    for obj in objects:
        mask = shape_mask(obj.shape, obj.size)
        box = image[obj.y0 : obj.y0 + obj.size, obj.x0 : obj.x0 + obj.size]
        box[mask] = PALETTE[obj.color]
    return image


# ---------------------------------------------------------------- placement


def box_gap(a: ShapeObject, b: ShapeObject) -> int:
    """Chebyshev gap between two boxes: background pixels between them along the wider-apart axis."""
    gap_x = max(b.x0 - (a.x0 + a.size), a.x0 - (b.x0 + b.size))
    gap_y = max(b.y0 - (a.y0 + a.size), a.y0 - (b.y0 + b.size))
    return max(gap_x, gap_y)


def relation_offsets(first: tuple[float, float], second: tuple[float, float], relation: str) -> tuple[float, float]:
    """(along, across): how far the first box centre lies from the second in the relation's direction (> 0 when on
    its side), and across it."""
    dx = second[0] - first[0]  # > 0 when the first is left of the second
    dy = second[1] - first[1]  # > 0 when the first is above the second
    return {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]


PERPENDICULAR = {
    "left of": ("above", "below"),
    "right of": ("above", "below"),
    "above": ("left of", "right of"),
    "below": ("left of", "right of"),
}


def contrast_prompts(prompt: Prompt) -> tuple[Prompt, ...]:
    """The prompts an image for `prompt` must not also answer: for a relation, the same two objects in the two
    perpendicular relations (a pair placed diagonally answers them as much as its own); none for other kinds."""
    if prompt.kind != "relation":
        return ()
    return tuple(replace(prompt, relation=other) for other in PERPENDICULAR[prompt.relation])


def relation_holds(first: tuple[float, float], second: tuple[float, float], relation: str) -> bool:
    """The spec's relation rule between two box centres."""
    along, across = relation_offsets(first, second, relation)
    return along >= RELATION_MIN_OFFSET and abs(along) > abs(across)


def corner_positions(side: int, placement: str = "grid") -> np.ndarray:
    """Every top-left coordinate (along one axis) a box of `side` may take under `placement`."""
    last = CANVAS - MARGIN - side
    if placement == "grid":
        return np.arange(GRID_OFFSET, last + 1, GRID_STEP)
    if placement == "free":
        return np.arange(MARGIN, last + 1)
    raise ValueError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")


def _place(
    specs: Sequence[tuple[int, int, int]], rng: np.random.Generator, relation: str | None, placement: str
) -> list[ShapeObject]:
    """Uniform placement by rejection: (color, shape, side) triples to non-overlapping objects."""
    corners = {side: corner_positions(side, placement) for _, _, side in specs}
    while True:
        objects = []
        for color, shape, side in specs:
            x0, y0 = rng.choice(corners[side], size=2)
            objects.append(ShapeObject(color, shape, side, int(x0), int(y0)))
        apart = all(box_gap(a, b) >= GAP for i, a in enumerate(objects) for b in objects[i + 1 :])
        if apart and (relation is None or relation_holds(objects[0].center, objects[1].center, relation)):
            return objects


def sample_scene(prompt: Prompt, rng: np.random.Generator, placement: str = "grid") -> list[ShapeObject]:
    """Objects drawn for a prompt, sizes and places at random where the prompt leaves them open."""
    sides = list(SIZES.values())

    def side(spec: ObjectSpec) -> int:
        return spec.size if spec.size is not None else sides[rng.integers(len(sides))]

    if prompt.kind == "count":
        spec = prompt.objects[0]
        triples = [(spec.color, spec.shape, SIZES["small"])] * prompt.count
    else:
        triples = [(s.color, s.shape, side(s)) for s in prompt.objects]
    return _place(triples, rng, prompt.relation, placement)


def render_prompts(prompts: Sequence[Prompt], rng: np.random.Generator, placement: str = "grid") -> list[np.ndarray]:
    """A world image per prompt, the scenes drawn from `rng` in the prompts' order: the data models are judged by."""
    return [render(sample_scene(p, rng, placement)) for p in prompts]


# ---------------------------------------------------------------- prompts


def _distinct_pair(rng: np.random.Generator) -> tuple[ObjectSpec, ObjectSpec]:
    while True:
        a = ObjectSpec(int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES))))
        b = ObjectSpec(int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES))))
        if a != b:
            return a, b


def sample_prompt(rng: np.random.Generator, kinds: Sequence[str] = KINDS) -> Prompt:
    """A prompt of a kind drawn uniformly from `kinds`, its words drawn uniformly within the kind."""
    kind = kinds[rng.integers(len(kinds))]
    color, shape = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))
    if kind == "single":
        return Prompt(kind, (ObjectSpec(color, shape),))
    if kind == "sized":
        side = list(SIZES.values())[rng.integers(len(SIZES))]
        return Prompt(kind, (ObjectSpec(color, shape, side),))
    if kind == "count":
        return Prompt(kind, (ObjectSpec(color, shape),), count=int(rng.integers(2, 4)))
    if kind == "pair":
        return Prompt(kind, _distinct_pair(rng))
    if kind == "relation":
        return Prompt(kind, _distinct_pair(rng), relation=RELATIONS[rng.integers(len(RELATIONS))])
    raise ValueError(f"unknown prompt kind {kind!r}; kinds are {', '.join(KINDS)}")


def weighted_kinds(kinds: Sequence[str], weights: Sequence[int] = ()) -> tuple[str, ...]:
    """`kinds` with each repeated as often as its weight says, for `sample_prompt` to draw from uniformly: a kind
    of weight 2 comes twice as often as one of weight 1. No weights: `kinds` as they are."""
    if not weights:
        return tuple(kinds)
    if len(weights) != len(kinds) or any(not isinstance(w, int) or w < 1 for w in weights):
        raise ValueError(f"one whole weight >= 1 for each of the kinds {', '.join(kinds)}, got {list(weights)}")
    return tuple(kind for kind, weight in zip(kinds, weights) for _ in range(weight))


def every_prompt() -> list[Prompt]:
    """The grammar's whole language, 1,620 prompts: every kind with every choice of words."""
    objects = [ObjectSpec(c, s) for c in range(len(COLORS)) for s in range(len(SHAPES))]
    pairs = [(a, b) for a in objects for b in objects if a != b]
    return [
        *(Prompt("single", (o,)) for o in objects),
        *(Prompt("sized", (ObjectSpec(o.color, o.shape, side),)) for o in objects for side in SIZES.values()),
        *(Prompt("count", (o,), count=k) for o in objects for k in COUNT_WORDS.values()),
        *(Prompt("pair", pair) for pair in pairs),
        *(Prompt("relation", pair, relation=r) for pair in pairs for r in RELATIONS),
    ]


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_OBJ = rf"(?:(small|large) )?({_COLOR}) ({_SHAPE})"
_PATTERNS = {
    "object": re.compile(rf"a {_OBJ}"),
    "count": re.compile(rf"({'|'.join(COUNT_WORDS)}) ({_COLOR}) ({'|'.join(PLURALS)})"),
    "two": re.compile(rf"a ({_COLOR}) ({_SHAPE}) ({'and|' + '|'.join(RELATIONS)}) a ({_COLOR}) ({_SHAPE})"),
}


def _either(words) -> str:
    return "(?:" + "|".join(words) + ")"


@lru_cache(maxsize=None)
def prompt_pattern() -> str:
    """The grammar as one anchored regular expression that ECMA-262 (JSON Schema) and Python read alike: it
    matches exactly the prompts parse_prompt accepts, built from the same words.

    The two objects of a pair or relation must differ, which a regular expression can only say by listing, for
    each first object, the second objects allowed after it: its colour with another shape, or another colour."""
    color, shape = _either(COLORS), _either(SHAPES)
    one = f"a (?:{_either(SIZES)} )?{color} {shape}"
    count = f"{_either(COUNT_WORDS)} {color} {_either(PLURALS)}"
    joiner = _either(("and", *RELATIONS))
    firsts = []
    for c in COLORS:
        for s in SHAPES:
            other_shapes = _either(x for x in SHAPES if x != s)
            other_colors = _either(x for x in COLORS if x != c)
            firsts.append(f"{c} {s} {joiner} a (?:{c} {other_shapes}|{other_colors} {shape})")
    return f"^(?:{one}|{count}|a {_either(firsts)})$"


def parse_prompt(text: str) -> Prompt:
    """Parse a prompt of the Shapes grammar; anything else raises PromptError naming the vocabulary."""
    if m := _PATTERNS["object"].fullmatch(text):
        size, color, shape = m.groups()
        spec = ObjectSpec(COLORS.index(color), SHAPES.index(shape), SIZES[size] if size else None)
        return Prompt("sized" if size else "single", (spec,))
    if m := _PATTERNS["count"].fullmatch(text):
        word, color, plural = m.groups()
        return Prompt("count", (ObjectSpec(COLORS.index(color), PLURALS.index(plural)),), count=COUNT_WORDS[word])
    if m := _PATTERNS["two"].fullmatch(text):
        c1, s1, joiner, c2, s2 = m.groups()
        a = ObjectSpec(COLORS.index(c1), SHAPES.index(s1))
        b = ObjectSpec(COLORS.index(c2), SHAPES.index(s2))
        if a == b:
            raise PromptError(f"the two objects of {text!r} must differ in colour or shape")
        if joiner == "and":
            return Prompt("pair", (a, b))
        return Prompt("relation", (a, b), relation=joiner)
    unknown = sorted({w for w in text.split(" ") if w not in VOCABULARY})
    hint = f"unknown words {unknown}; " if unknown else ""
    raise PromptError(
        f"{text!r} is not a Shapes prompt: {hint}prompts are lower case, single-spaced, of the forms "
        "'a {color} {shape}', 'a {size} {color} {shape}', 'a {color} {shape} and a {color} {shape}', "
        "'{two|three} {color} {shape}s', 'a {color} {shape} {left of|right of|above|below} a {color} {shape}'; "
        f"colors: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; sizes: {', '.join(SIZES)}"
    )


# ---------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Sample:
    """One training example: the image, its prompt text, its class label (-1 unless a single-kind prompt), its
    objects."""

    image: np.ndarray
    prompt: str
    label: int
    objects: tuple[ShapeObject, ...] = ()


def sample(rng: np.random.Generator, kinds: Sequence[str] = KINDS, placement: str = "grid") -> Sample:
    prompt = sample_prompt(rng, kinds)
    objects = tuple(sample_scene(prompt, rng, placement))
    label = class_label(prompt.objects[0].color, prompt.objects[0].shape) if prompt.kind == "single" else -1
    return Sample(image=render(objects), prompt=prompt.text(), label=label, objects=objects)


def stream(seed: int, kinds: Sequence[str] = KINDS, placement: str = "grid") -> Iterator[Sample]:
    """An endless, seeded stream of samples; the same seed gives the same stream."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample(rng, kinds, placement)


def batch(
    rng: np.random.Generator, size: int, kinds: Sequence[str] = KINDS, placement: str = "grid"
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`size` samples stacked: images (B, 64, 64, 3) uint8, prompts, labels (B,)."""
    samples = [sample(rng, kinds, placement) for _ in range(size)]
    images = np.stack([s.image for s in samples])
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return images, [s.prompt for s in samples], labels
