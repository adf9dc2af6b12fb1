"""Training stage: the CLIP-style Shapes reward, contrastive with hard negative prompts and hard negative images."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from softdimo import shapes
from softdimo.reward import AlignmentConfig, AlignmentModel, relation_rows
from softdimo.text import PromptTokenizer
from softdimo.train import loop
from softdimo.vq import to_tensor


@dataclass(frozen=True)
class RewardTraining:
    steps: int = 2000
    batch_size: int = 64
    negatives: int = 4  # hard negative prompts per image
    image_negatives: int = 0  # hard negative images per prompt (negative_scene): an object too many, too few, or merged
    lr: float = 1e-3
    warmup: int = 100
    pixel_noise: float = 0.1  # std of Gaussian noise added to images, so decoded (imperfect) images score sensibly
    grounding_weight: float = 1.0  # with a grounding model: weight of the loss on where it finds each object
    seed: int = 0
    eval_every: int = 500
    placement: str = "grid"  # where the world's objects sit (shapes.PLACEMENTS)


def hard_negative(prompt: shapes.Prompt, rng: np.random.Generator) -> shapes.Prompt:
    """A prompt one edit away from `prompt`: another colour, shape, size, count, relation, or the objects swapped."""
    objects = list(prompt.objects)
    edits = ["color", "shape"]
    if prompt.kind == "sized":
        edits.append("size")
    if prompt.kind == "count":
        edits.append("count")
    if prompt.kind == "relation":
        edits += ["relation", "swap", "swap"]
    while True:
        edit = edits[rng.integers(len(edits))]
        i = int(rng.integers(len(objects)))
        changed = list(objects)
        if edit == "color":
            changed[i] = replace(objects[i], color=int(rng.integers(len(shapes.COLORS))))
        elif edit == "shape":
            changed[i] = replace(objects[i], shape=int(rng.integers(len(shapes.SHAPES))))
        elif edit == "size":
            changed[i] = replace(objects[i], size=24 if objects[i].size == 12 else 12)
        if edit == "count":
            candidate = replace(prompt, count=5 - prompt.count)  # two <-> three
        elif edit == "relation":
            candidate = replace(prompt, relation=shapes.RELATIONS[rng.integers(len(shapes.RELATIONS))])
        elif edit == "swap":
            candidate = replace(prompt, objects=(objects[1], objects[0]))
        else:
            candidate = replace(prompt, objects=tuple(changed))
        distinct_pair = len(candidate.objects) < 2 or candidate.objects[0] != candidate.objects[1]
        if candidate != prompt and distinct_pair:
            return candidate


def _merged(a: shapes.ShapeObject, b: shapes.ShapeObject) -> bool:
    """Is `a`, drawn over `b`, drawn with it as a misshapen blob: of one colour, their pixels touch or overlap; of
    two, `a` covers at least a quarter of `b`?"""
    masks = []
    for obj in (a, b):
        mask = np.zeros((shapes.CANVAS, shapes.CANVAS), dtype=bool)
        mask[obj.y0 : obj.y0 + obj.size, obj.x0 : obj.x0 + obj.size] = shapes.shape_mask(obj.shape, obj.size)
        masks.append(mask)
    if a.color != b.color:
        return (masks[0] & masks[1]).sum() >= masks[1].sum() / 4
    return bool((ndimage.binary_dilation(masks[0], structure=np.ones((3, 3), bool)) & masks[1]).any())


def negative_scene(
    scene: list[shapes.ShapeObject], rng: np.random.Generator, placement: str = "grid"
) -> list[shapes.ShapeObject]:
    """A scene one edit away that no longer shows its prompt, as a one-step generator fails: an object too many
    (a copy of one of its own, or of any other class, apart from the rest), one too few, or two objects moved
    together until their pixels meet."""
    edits = ["extra_copy", "extra_other", "missing"] + (["merged"] * 2 if len(scene) > 1 else [])
    while True:
        edit = edits[rng.integers(len(edits))]
        if edit == "missing":
            i = int(rng.integers(len(scene)))
            return scene[:i] + scene[i + 1 :]
        if edit.startswith("extra"):
            like = scene[rng.integers(len(scene))]
            if edit == "extra_other":
                like = replace(
                    like, color=int(rng.integers(len(shapes.COLORS))), shape=int(rng.integers(len(shapes.SHAPES)))
                )
            x0, y0 = rng.choice(shapes.corner_positions(like.size, placement), size=2)
            extra = replace(like, x0=int(x0), y0=int(y0))
            if all(shapes.box_gap(extra, other) >= shapes.GAP for other in scene):
                return [*scene, extra]
            continue
        i, j = rng.choice(len(scene), size=2, replace=False)
        corners = shapes.corner_positions(scene[i].size, placement)
        moved = [replace(scene[i], x0=int(x), y0=int(y)) for x in corners for y in corners]
        near = [m for m in moved if shapes.box_gap(m, scene[j]) <= 0 and (m.x0, m.y0) != (scene[j].x0, scene[j].y0)]
        meeting = [m for m in near if _merged(m, scene[j])]  # pixels can meet only where the boxes do
        if meeting:
            rest = [obj for k, obj in enumerate(scene) if k != i]
            return rest + [meeting[rng.integers(len(meeting))]]


def rendered(scenes: list[list[shapes.ShapeObject]], device: torch.device) -> torch.Tensor:
    """Scenes drawn as model input (B, 3, H, W) on `device`."""
    return to_tensor(np.stack([shapes.render(scene) for scene in scenes])).to(device)


def contrastive_loss(
    model: AlignmentModel,
    images: torch.Tensor,
    prompts: list[str],
    negatives: list[list[str]],
    negative_images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image -> (all batch prompts + its own hard negatives) and prompt -> (batch images + its own hard negative
    images (B, k', 3, H, W), if any) cross-entropy, over the model's scores (with grounding, each pair's relation
    score is part of its logit)."""
    b, k = len(prompts), len(negatives[0])
    features = model.image.feature_map(images)
    image_emb = model.image.embed(features)  # (B, D)
    text_emb = model.encode_prompts(prompts)  # (B, D)
    flat_negatives = [n for row in negatives for n in row]
    negative_emb = model.encode_prompts(flat_negatives).view(b, k, -1)  # (B, k, D)
    scale = model.log_scale.exp()
    batch_logits = scale * image_emb @ text_emb.T  # (B, B)
    own_negatives = scale * torch.einsum("bd,bkd->bk", image_emb, negative_emb)  # (B, k)
    if model.cfg.grounding:
        positions = model.grounding.positions(features)  # (B, 18, 2)
        every_prompt = relation_rows(prompts, images.device).repeat(b, 1)  # image i with prompt j at row i * B + j
        batch_logits = batch_logits + model.grounding.relation_scores(
            positions.repeat_interleave(b, 0), every_prompt
        ).view(b, b)
        own = relation_rows(flat_negatives, images.device)
        own_negatives = own_negatives + model.grounding.relation_scores(positions.repeat_interleave(k, 0), own).view(
            b, k
        )
    prompt_logits = batch_logits.T  # (B prompts, B images)
    if negative_images is not None:
        prompt_logits = torch.cat(
            [prompt_logits, _negative_image_scores(model, negative_images, prompts, text_emb)], dim=1
        )
    target = torch.arange(b, device=images.device)
    image_to_text = F.cross_entropy(torch.cat([batch_logits, own_negatives], dim=1), target)
    text_to_image = F.cross_entropy(prompt_logits, target)
    return (image_to_text + text_to_image) / 2


def _negative_image_scores(
    model: AlignmentModel, images: torch.Tensor, prompts: list[str], text_emb: torch.Tensor
) -> torch.Tensor:
    """Each prompt's score on its own hard negative images (B, k', 3, H, W) -> (B, k')."""
    b, k = images.shape[:2]
    features = model.image.feature_map(images.flatten(0, 1))
    scores = model.log_scale.exp() * torch.einsum("bkd,bd->bk", model.image.embed(features).view(b, k, -1), text_emb)
    if model.cfg.grounding:
        rows = relation_rows(prompts, images.device).repeat_interleave(k, 0)
        scores = scores + model.grounding.relation_scores(model.grounding.positions(features), rows).view(b, k)
    return scores


def object_places(scenes: list[list[shapes.ShapeObject]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each colour-shape object of each scene is, in [-1, 1] image units: places (B, 18, 2) and a mask
    (B, 18) of the objects that occur exactly once in their scene (a count's several objects have no one place)."""
    places = torch.zeros(len(scenes), shapes.NUM_CLASSES, 2)
    seen = torch.zeros(len(scenes), shapes.NUM_CLASSES)
    for i, scene in enumerate(scenes):
        for obj in scene:
            label = shapes.class_label(obj.color, obj.shape)
            places[i, label] = torch.tensor(obj.center) / shapes.CANVAS * 2 - 1
            seen[i, label] += 1
    return places.to(device), (seen == 1).to(device)


def grounding_loss(
    model: AlignmentModel, images: torch.Tensor, places: torch.Tensor, known: torch.Tensor
) -> torch.Tensor:
    """Squared distance between where the grounding finds each object and where it is, over the known objects."""
    found = model.grounding.positions(model.image.feature_map(images))  # (B, 18, 2)
    return ((found - places) ** 2).sum(-1)[known].mean()


def train_reward(run_dir: Path, cfg: AlignmentConfig, training: RewardTraining, device: torch.device) -> AlignmentModel:
    torch.manual_seed(training.seed)
    model = AlignmentModel(cfg, PromptTokenizer(shapes.VOCABULARY, 12)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=0.01)

    def batch(step: int):
        rng = np.random.default_rng([training.seed, step])
        prompts = [shapes.sample_prompt(rng) for _ in range(training.batch_size)]
        scenes = [shapes.sample_scene(p, rng, training.placement) for p in prompts]
        negatives = [[hard_negative(p, rng).text() for _ in range(training.negatives)] for p in prompts]
        negative_scenes = [
            negative_scene(scene, rng, training.placement) for scene in scenes for _ in range(training.image_negatives)
        ]
        noise = torch.Generator().manual_seed(step)

        def pixels(scene_list):
            x = rendered(scene_list, device)
            return (x + training.pixel_noise * torch.randn(x.shape, generator=noise).to(device)).clamp(0, 1)

        negative_images = pixels(negative_scenes).unflatten(0, (len(scenes), -1)) if negative_scenes else None
        return pixels(scenes), [p.text() for p in prompts], negatives, negative_images, scenes

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        images, prompts, negatives, negative_images, scenes = batch(step)
        loss = contrastive_loss(model, images, prompts, negatives, negative_images)
        metrics = {"loss": loss.item()}
        if cfg.grounding:
            places = grounding_loss(model, images, *object_places(scenes, device))
            loss = loss + training.grounding_weight * places
            metrics["places"] = places.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return metrics

    def eval_fn(step: int) -> dict[str, float]:
        return hard_negative_accuracy(model, count=200, seed=30_000, placement=training.placement)

    loop.run(
        run_dir=run_dir,
        modules={"reward": model},
        optimizers={"reward": optimizer},
        step_fn=step_fn,
        steps=training.steps,
        eval_fn=eval_fn,
        eval_every=training.eval_every,
        description="reward",
    )
    return model.eval()


@torch.no_grad()
def hard_negative_wins(
    model: AlignmentModel, count: int, seed: int, placement: str = "grid"
) -> tuple[list[shapes.Prompt], torch.Tensor, torch.Tensor]:
    """Held-out prompts and, per prompt and its image, whether the true prompt scores above every one of 4 hard
    negative prompts, and whether the true image scores above every one of 4 hard negative images."""
    rng = np.random.default_rng(seed)
    prompts = [shapes.sample_prompt(rng) for _ in range(count)]
    scenes = [shapes.sample_scene(p, rng, placement) for p in prompts]
    device = model.log_scale.device
    images = rendered(scenes, device)
    texts = [p.text() for p in prompts]
    true = model.similarity(images, texts)
    prompt_wins = torch.ones(count, dtype=torch.bool, device=device)
    for _ in range(4):
        negatives = [hard_negative(p, rng).text() for p in prompts]
        prompt_wins &= true > model.similarity(images, negatives)
    image_rng = np.random.default_rng([seed, 1])
    image_wins = torch.ones(count, dtype=torch.bool, device=device)
    for _ in range(4):
        negatives = rendered([negative_scene(s, image_rng, placement) for s in scenes], device)
        image_wins &= true > model.similarity(negatives, texts)
    return prompts, prompt_wins.cpu(), image_wins.cpu()


def hard_negative_accuracy(model: AlignmentModel, count: int, seed: int, placement: str = "grid") -> dict[str, float]:
    """Shares of held-out images whose true prompt scores above every one of 4 hard negative prompts, and of
    held-out prompts whose true image scores above every one of 4 hard negative images."""
    _, prompt_wins, image_wins = hard_negative_wins(model, count, seed, placement)
    return {
        "hard_negative_accuracy": prompt_wins.float().mean().item(),
        "hard_image_accuracy": image_wins.float().mean().item(),
    }
