"""The Shapes judge: objects read from pixels, checked against a prompt; pass rates, per-prompt layout coverage and
a Fréchet distance."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import linalg, ndimage

from softdimo import shapes

NOISE_AREA = 16  # components smaller than this are stray pixels, not objects
NOISE_BUDGET = 48  # more stray pixels than this in one image and it fails
MIN_FIT_IOU = 0.85  # an object whose best shape fit is worse than this is misshaped
FIT_SLACK = 2  # pixels the template may move around the component's box when fitting

_COLORS_WITH_BACKGROUND = np.concatenate([np.zeros((1, 3), dtype=np.int32), shapes.PALETTE.astype(np.int32)])
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class DetectedObject(shapes.ShapeObject):
    """An object read from pixels: palette colour, best-fitting shape and side, box corner, and its fit quality."""

    iou: float


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str  # "ok" or what failed


def palette_indices(image: np.ndarray) -> np.ndarray:
    """(H, W) index of each pixel's nearest colour: 0 is the background, 1 + i is palette colour i."""
    pixels = image.astype(np.int32)[..., None, :]  # (H, W, 1, 3)
    distances = ((pixels - _COLORS_WITH_BACKGROUND) ** 2).sum(-1)  # (H, W, 7)
    return distances.argmin(-1)


def _best_fit(component: np.ndarray) -> tuple[int, int, int, int, float]:
    """(shape, side, x0, y0, iou) of the shape template that best covers a boolean component mask."""
    ys, xs = np.nonzero(component)
    area = len(ys)
    margin = max(shapes.SIZES.values()) + FIT_SLACK
    padded = np.pad(component, margin).astype(np.int32)
    best = (0, 0, 0, 0, -1.0)
    for side in shapes.SIZES.values():
        for shape in range(len(shapes.SHAPES)):
            template = shapes.shape_mask(shape, side)
            tys, txs = np.nonzero(template)
            # Align the template's pixel box with the component's, then search FIT_SLACK around it: the component's
            # pixels under the template at every offset (dy, dx) at once.
            x_lo = xs.min() - txs.min() - FIT_SLACK
            y_lo = ys.min() - tys.min() - FIT_SLACK
            reach = side + 2 * FIT_SLACK
            window = padded[margin + y_lo : margin + y_lo + reach, margin + x_lo : margin + x_lo + reach]
            hits = np.einsum("abij,ij->ab", np.lib.stride_tricks.sliding_window_view(window, (side, side)), template)
            ious = hits / (area + len(tys) - hits)
            dy, dx = np.unravel_index(ious.argmax(), ious.shape)  # the first best, as a scan in (dy, dx) order
            if ious[dy, dx] > best[4]:
                best = (shape, side, int(x_lo + dx), int(y_lo + dy), float(ious[dy, dx]))
    return best


def detect(image: np.ndarray) -> tuple[list[DetectedObject], int]:
    """The objects in an image, and how many stray pixels were set aside as noise."""
    indices = palette_indices(image)
    objects, stray = [], 0
    for color in range(len(shapes.COLORS)):
        labelled, count = ndimage.label(indices == color + 1, structure=_EIGHT_CONNECTED)
        for k in range(1, count + 1):
            component = labelled == k
            area = int(component.sum())
            if area < NOISE_AREA:
                stray += area
                continue
            shape, side, x0, y0, iou = _best_fit(component)
            objects.append(DetectedObject(color, shape, side, x0, y0, iou))
    return objects, stray


def judge(image: np.ndarray, prompt: shapes.Prompt) -> Verdict:
    """Does the image show what the prompt asks, and nothing else?"""
    return verdict(*detect(image), prompt)


def verdict(objects: Sequence[DetectedObject], stray: int, prompt: shapes.Prompt) -> Verdict:
    """`judge` of an image whose objects and stray pixels `detect` has read."""
    if stray > NOISE_BUDGET:
        return Verdict(False, f"noise: {stray} stray pixels")
    misshaped = [o for o in objects if o.iou < MIN_FIT_IOU]
    if misshaped:
        return Verdict(False, f"shape: an object fits no shape (best IoU {misshaped[0].iou:.2f})")
    wanted = prompt.count if prompt.kind == "count" else len(prompt.objects)
    if len(objects) != wanted:
        return Verdict(False, f"count: {len(objects)} objects, wanted {wanted}")
    specs = list(prompt.objects) * (prompt.count if prompt.kind == "count" else 1)
    seen = Counter((o.color, o.shape) for o in objects)
    asked = Counter((s.color, s.shape) for s in specs)
    if seen != asked:
        colors_ok = Counter(o.color for o in objects) == Counter(s.color for s in specs)
        return Verdict(False, "shape: wrong shapes" if colors_ok else "colour: wrong colours")
    if prompt.kind == "sized" and objects[0].size != prompt.objects[0].size:
        return Verdict(False, f"size: side {objects[0].size}, wanted {prompt.objects[0].size}")
    if prompt.kind == "count" and any(o.size != shapes.SIZES["small"] for o in objects):
        return Verdict(False, "size: counted objects must be small")
    if prompt.kind == "relation":
        a, b = prompt.objects
        first = next(o for o in objects if (o.color, o.shape) == (a.color, a.shape))
        second = next(o for o in objects if o is not first)
        if not shapes.relation_holds(first.center, second.center, prompt.relation):
            along, _ = shapes.relation_offsets(first.center, second.center, prompt.relation)
            if along >= shapes.RELATION_MIN_OFFSET:  # on the right side, but as far or further across: diagonal
                return Verdict(False, f"diagonal: {prompt.relation}, but as far or further across")
            return Verdict(False, f"relation: not {prompt.relation}")
    return Verdict(True, "ok")


@dataclass(frozen=True)
class PassRates:
    """Pass rate per prompt kind and overall, with how many prompts each rate is over."""

    per_kind: dict[str, float]
    counts: dict[str, int]
    overall: float
    failures: dict[str, int]  # failure category -> how many

    def metrics(self) -> dict[str, float]:
        """As a training run logs them: `pass` overall and `pass_KIND` for each kind."""
        return {"pass": self.overall, **{f"pass_{kind}": rate for kind, rate in self.per_kind.items()}}

    def table(self) -> str:
        header = "| " + " | ".join([*self.per_kind, "overall"]) + " |"
        rule = "|" + "---|" * (len(self.per_kind) + 1)
        row = "| " + " | ".join(f"{v:.3f}" for v in [*self.per_kind.values(), self.overall]) + " |"
        return "\n".join([header, rule, row])


def pass_rates(images: Iterable[np.ndarray], prompts: Iterable[shapes.Prompt]) -> PassRates:
    passed, counts, failures = defaultdict(int), defaultdict(int), Counter()
    for image, prompt in zip(images, prompts, strict=True):
        verdict = judge(image, prompt)
        counts[prompt.kind] += 1
        passed[prompt.kind] += verdict.passed
        if not verdict.passed:
            failures[verdict.reason.split(":")[0]] += 1
    kinds = [k for k in shapes.KINDS if counts[k]]
    total = sum(counts.values())
    return PassRates(
        per_kind={k: passed[k] / counts[k] for k in kinds},
        counts={k: counts[k] for k in kinds},
        overall=sum(passed.values()) / max(total, 1),
        failures=dict(failures),
    )


def held_out_prompts(count: int, seed: int = 2026, kinds: Sequence[str] = shapes.KINDS) -> list[shapes.Prompt]:
    """A fixed evaluation set: `count` prompts, an equal share of each kind, from a seed no training run uses."""
    rng = np.random.default_rng(seed)
    return [shapes.sample_prompt(rng, kinds=(kinds[i % len(kinds)],)) for i in range(count)]


LAYOUT_GRID = 4  # px: a layout's object centres are rounded to this
COVERAGE_SEEDS = 64  # images of a prompt that coverage reads: seeds 0 .. 63, against as many of the world's scenes

Layout = frozenset  # of (colour, shape, x, y): each detected object with its centre rounded to LAYOUT_GRID


def layout(image: np.ndarray) -> Layout:
    """Where an image's objects are: each detected object as (colour, shape, centre rounded to LAYOUT_GRID px)."""
    return layout_of(detect(image)[0])


def layout_of(objects: Sequence[shapes.ShapeObject]) -> Layout:
    def rounded(c: float) -> int:
        return LAYOUT_GRID * int(np.floor(c / LAYOUT_GRID + 0.5))

    return frozenset((o.color, o.shape, *(rounded(c) for c in o.center)) for o in objects)


@dataclass(frozen=True)
class PromptCoverage:
    """How many of the data's layouts one prompt's images reach: the distinct layouts of the images that pass,
    against the distinct layouts of as many of the world's own images of the prompt."""

    prompt: shapes.Prompt
    images: int
    passed: int
    distinct: int  # distinct layouts among the passing images
    commonest: int  # passing images that share the commonest layout
    data_distinct: int
    data_commonest: int

    @property
    def coverage(self) -> float:
        return self.distinct / self.data_distinct


def prompt_coverage(images: Sequence[np.ndarray], data: Sequence[np.ndarray], prompt: shapes.Prompt) -> PromptCoverage:
    """One prompt's coverage: `images` drawn with different seeds, `data` the world's scenes of the same prompt."""
    read = [detect(image) for image in images]
    passing = Counter(layout_of(objects) for objects, stray in read if verdict(objects, stray, prompt).passed)
    data_layouts = Counter(layout(image) for image in data)
    return PromptCoverage(
        prompt=prompt,
        images=len(images),
        passed=sum(passing.values()),
        distinct=len(passing),
        commonest=max(passing.values(), default=0),
        data_distinct=len(data_layouts),
        data_commonest=max(data_layouts.values()),
    )


@dataclass(frozen=True)
class Coverage:
    """Layout coverage over several prompts: its mean, its minimum and the commonest layout's share, per kind too."""

    prompts: tuple[PromptCoverage, ...]

    @property
    def mean(self) -> float:
        return float(np.mean([p.coverage for p in self.prompts]))

    @property
    def minimum(self) -> float:
        return min(p.coverage for p in self.prompts)

    @property
    def commonest(self) -> float:
        """The mean share of a prompt's images that its commonest passing layout holds."""
        return float(np.mean([p.commonest / p.images for p in self.prompts]))

    @property
    def data_commonest(self) -> float:
        return float(np.mean([p.data_commonest / p.images for p in self.prompts]))

    @property
    def per_kind(self) -> dict[str, float]:
        kinds = [k for k in shapes.KINDS if any(p.prompt.kind == k for p in self.prompts)]
        return {k: float(np.mean([p.coverage for p in self.prompts if p.prompt.kind == k])) for k in kinds}

    def metrics(self) -> dict[str, float]:
        """As a training run logs them: `coverage` (mean), `coverage_min` and `coverage_commonest`."""
        return {"coverage": self.mean, "coverage_min": self.minimum, "coverage_commonest": self.commonest}


def coverage(images: Sequence[np.ndarray], data: Sequence[np.ndarray], prompts: Sequence[shapes.Prompt]) -> Coverage:
    """Coverage of prompts whose images (and the data's) come in equal consecutive runs, one run per prompt."""
    per, rest = divmod(len(images), len(prompts))
    if rest or len(data) != len(images):
        raise ValueError(
            f"{len(images)} images and {len(data)} data images do not split evenly over {len(prompts)} prompts"
        )
    runs = [slice(i * per, (i + 1) * per) for i in range(len(prompts))]
    return Coverage(tuple(prompt_coverage(images[r], data[r], p) for r, p in zip(runs, prompts)))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a = np.cov(features_a, rowvar=False)
    cov_b = np.cov(features_b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
