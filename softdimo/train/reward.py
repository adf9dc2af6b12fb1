"""Training stage: the CLIP-style Shapes reward, contrastive with hard negative prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from softdimo import shapes
from softdimo.bundle import save_bundle
from softdimo.reward import AlignmentConfig, AlignmentModel
from softdimo.text import PromptTokenizer
from softdimo.train import loop
from softdimo.vq import to_tensor


@dataclass(frozen=True)
class RewardTraining:
    steps: int = 2000
    batch_size: int = 64
    negatives: int = 4  # hard negative prompts per image
    lr: float = 1e-3
    warmup: int = 100
    pixel_noise: float = 0.1  # std of Gaussian noise added to images, so decoded (imperfect) images score sensibly
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


def joint_loss(model: AlignmentModel, images: torch.Tensor, prompts: list[str], negatives: list[list[str]]) -> torch.Tensor:
    """For a joint scorer: each image against its prompt, its hard negatives and the next image's prompt, as a
    choice among them (cross-entropy) and as calibrated match log-odds (binary cross-entropy)."""
    b = len(prompts)
    candidates = [[p, *row, prompts[(i + 1) % b]] for i, (p, row) in enumerate(zip(prompts, negatives))]
    c = len(candidates[0])
    features = model.image.feature_map(images)  # (B, C, h, w)
    logits = model.joint_scores(features.repeat_interleave(c, dim=0), [p for row in candidates for p in row]).view(b, c)
    same = torch.tensor([[p == row[0] for p in row] for row in candidates], device=images.device)  # the next prompt may be equal
    choice = F.cross_entropy(logits.masked_fill(same & (torch.arange(c, device=images.device) > 0), -1e4), torch.zeros(b, dtype=torch.long, device=images.device))
    match = F.binary_cross_entropy_with_logits(logits, same.float())
    return choice + match


def contrastive_loss(model: AlignmentModel, images: torch.Tensor, prompts: list[str], negatives: list[list[str]]) -> torch.Tensor:
    """Image -> (all batch prompts + its own hard negatives) and prompt -> batch images cross-entropy."""
    if model.cfg.joint_layers:
        return joint_loss(model, images, prompts, negatives)
    b = len(prompts)
    image_emb = model.image(images)  # (B, D)
    text_emb = model.encode_prompts(prompts)  # (B, D)
    k = len(negatives[0])
    negative_emb = model.encode_prompts([n for row in negatives for n in row]).view(b, k, -1)  # (B, k, D)
    scale = model.log_scale.exp()
    batch_logits = scale * image_emb @ text_emb.T  # (B, B)
    own_negatives = scale * torch.einsum("bd,bkd->bk", image_emb, negative_emb)  # (B, k)
    target = torch.arange(b, device=images.device)
    image_to_text = F.cross_entropy(torch.cat([batch_logits, own_negatives], dim=1), target)
    text_to_image = F.cross_entropy(batch_logits.T, target)
    return (image_to_text + text_to_image) / 2


def train_reward(run_dir: Path, cfg: AlignmentConfig, training: RewardTraining, device: torch.device) -> AlignmentModel:
    torch.manual_seed(training.seed)
    model = AlignmentModel(cfg, PromptTokenizer(shapes.VOCABULARY, 12)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=0.01)

    def batch(step: int):
        rng = np.random.default_rng([training.seed, step])
        prompts = [shapes.sample_prompt(rng) for _ in range(training.batch_size)]
        images = np.stack([shapes.render(shapes.sample_scene(p, rng, training.placement)) for p in prompts])
        negatives = [[hard_negative(p, rng).text() for _ in range(training.negatives)] for p in prompts]
        x = to_tensor(images).to(device)
        x = (x + training.pixel_noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(step)).to(device)).clamp(0, 1)
        return x, [p.text() for p in prompts], negatives

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        loss = contrastive_loss(model, *batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    def eval_fn(step: int) -> dict[str, float]:
        return {"hard_negative_accuracy": hard_negative_accuracy(model, count=200, seed=30_000, placement=training.placement)}

    loop.run(run_dir=run_dir, modules={"reward": model}, optimizers={"reward": optimizer}, step_fn=step_fn,
             steps=training.steps, eval_fn=eval_fn, eval_every=training.eval_every, description="reward")  # fmt: skip
    return model.eval()


@torch.no_grad()
def hard_negative_accuracy(model: AlignmentModel, count: int, seed: int, placement: str = "grid") -> float:
    """Share of held-out images whose true prompt scores above every one of 4 hard negatives."""
    rng = np.random.default_rng(seed)
    prompts = [shapes.sample_prompt(rng) for _ in range(count)]
    images = to_tensor(np.stack([shapes.render(shapes.sample_scene(p, rng, placement)) for p in prompts])).to(model.log_scale.device)
    true = model.similarity(images, [p.text() for p in prompts])
    wins = torch.ones(count, dtype=torch.bool, device=images.device)
    for _ in range(4):
        negatives = [hard_negative(p, rng).text() for p in prompts]
        wins &= true > model.similarity(images, negatives)
    return wins.float().mean().item()


def export_reward(model: AlignmentModel, path: Path, training: RewardTraining, name: str = "shapes-clip") -> Path:
    config = {
        "name": name, "kind": "reward", "alignment": model.cfg.to_dict(),
        "vocabulary": list(model.prompt_tokenizer.vocabulary), "length": model.prompt_tokenizer.length,
        "training": asdict(training),
    }  # fmt: skip
    return save_bundle(path, config, {"reward": model.state_dict()})
