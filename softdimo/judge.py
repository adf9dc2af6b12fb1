"""The Shapes judge: objects read from pixels, checked against a prompt; pass rates and a Fréchet distance."""

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
    best = (0, 0, 0, 0, -1.0)
    for side in shapes.SIZES.values():
        for shape in range(len(shapes.SHAPES)):
            template = shapes.shape_mask(shape, side)
            tys, txs = np.nonzero(template)
            # Align the template's pixel box with the component's, then search around it.
            base_x = xs.min() - txs.min()
            base_y = ys.min() - tys.min()
            for dy in range(-FIT_SLACK, FIT_SLACK + 1):
                for dx in range(-FIT_SLACK, FIT_SLACK + 1):
                    x0, y0 = base_x + dx, base_y + dy
                    inside = (ys >= y0) & (ys < y0 + side) & (xs >= x0) & (xs < x0 + side)
                    hits = int(template[ys[inside] - y0, xs[inside] - x0].sum())
                    iou = hits / (area + len(tys) - hits)
                    if iou > best[4]:
                        best = (shape, side, int(x0), int(y0), iou)
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
    objects, stray = detect(image)
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


def placement_spread(images: Iterable[np.ndarray]) -> float:
    """Mean standard deviation (pixels) of detected object centres: how varied placements are."""
    centres = [o.center for image in images for o in detect(image)[0]]
    if len(centres) < 2:
        return 0.0
    return float(np.asarray(centres).std(axis=0).mean())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a = np.cov(features_a, rowvar=False)
    cov_b = np.cov(features_b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
