"""Training stage: a one-step generator's latent filter (softdimo/latent_filter.py).

The stage draws its examples first: prompts from the world, proposals from the generator's layout prior as the
generator will draw them (its `prior_temperature` and `latent_scale`), each drawn into an image in one forward pass
and scored by the reward (kept in the run folder, so a resumed run reuses them). The filter then learns, by logistic
regression over many passes through them, whether a latent's image clears the reward bar; a share of the prompts is
held out, and the log reports the filter's accuracy and precision on their latents. The generator, its prior and the
reward stay as they are."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from softdimo import shapes
from softdimo.conditioning import Conditioner
from softdimo.generator import OneStepGenerator
from softdimo.latent_filter import LatentFilter, LatentFilterConfig
from softdimo.layout_prior import small_body
from softdimo.reward import Reward
from softdimo.seeding import ImageNoise
from softdimo.train import loop
from softdimo.vq import VQTokenizer


@dataclass(frozen=True)
class FilterNetwork:
    width: int = 128
    depth: int = 3
    heads: int = 4
    slots: int = 8  # positions the latent is spread over, beside the conditioning


@dataclass(frozen=True)
class FilterTraining:
    bar: float = 9.3  # the reward an image must reach to count as drawn right
    prompts: int = 6000  # prompts drawn from the world for the examples
    latents: int = 8  # proposals drawn per prompt, each drawn into an image and scored
    held_out: float = 0.1  # the share of the prompts whose latents only measure the filter
    steps: int = 3000
    batch_size: int = 256  # latents a step
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 500
    eval_prompts: int = 100


@torch.no_grad()
def scored_latents(
    generator: OneStepGenerator,
    tokenizer: VQTokenizer,
    reward: Reward,
    condition: torch.Tensor,
    texts: list[str],
    noise: ImageNoise,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One latent per noise stream, drawn from the prior as the generator would draw a proposal, and the reward of
    its image: condition (B, ...) with one stream per (prompt, latent) pair, prompt-major -> latents (B * M, L) and
    rewards (B * M,)."""
    m = len(noise) // condition.shape[0]
    condition = condition.repeat_interleave(m, 0)
    settings = generator.settings
    latents = generator.prior.sample(
        condition, noise, scale=settings.latent_scale, temperature=settings.prior_temperature
    )[:, 0]
    embeddings = generator.token_embeddings(noise)
    logits = generator.logits(generator.with_latent(embeddings, latents), condition)
    tokens = generator.tokens_from(logits, generator.token_noise(noise))
    images = tokenizer.decode_indices(tokens)
    return latents, reward.score(images, [t for t in texts for _ in range(m)]).float()


EXAMPLES = "examples.pt"


def _examples(path, generator, tokenizer, conditioner, reward, training: FilterTraining, device) -> dict:
    """The stage's scored latents, drawn once and kept at `path`: conditioning, latent, reward and whether it clears
    the bar, one row per (prompt, proposal), prompt-major."""
    if path.exists():
        return torch.load(path)
    rng = np.random.default_rng([training.seed, 1])
    parts: dict[str, list[torch.Tensor]] = {"condition": [], "latents": [], "rewards": []}
    per_batch = 32
    for _ in tqdm(range(0, training.prompts, per_batch), desc="scoring proposals"):
        drawn = [conditioner.for_prompt(shapes.sample_prompt(rng, conditioner.kinds)) for _ in range(per_batch)]
        condition = torch.cat([c for c, _ in drawn]).to(device)
        noise = ImageNoise(rng.integers(0, 2**62, size=per_batch * training.latents).tolist(), device)
        latents, rewards = scored_latents(generator, tokenizer, reward, condition, [t for _, t in drawn], noise)
        parts["condition"].append(condition.repeat_interleave(training.latents, 0).cpu())
        parts["latents"].append(latents.cpu())
        parts["rewards"].append(rewards.cpu())
    examples = {k: torch.cat(v)[: training.prompts * training.latents] for k, v in parts.items()}
    examples["cleared"] = (examples["rewards"] >= training.bar).float()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(examples, path)
    return examples


def _split(examples: dict, training: FilterTraining) -> tuple[dict, dict]:
    """The examples of the first prompts for training, those of the last `held_out` share for measuring."""
    cut = training.latents * round(training.prompts * (1 - training.held_out))
    return {k: v[:cut] for k, v in examples.items()}, {k: v[cut:] for k, v in examples.items()}


@torch.no_grad()
def filter_metrics(latent_filter: LatentFilter, examples: dict, device) -> dict[str, float]:
    """On held-out latents: the filter's accuracy, the share that clear the bar, and of those it accepts, the share
    that clear it (its precision)."""
    odds = torch.cat(
        [
            latent_filter.log_odds(
                examples["latents"][i : i + 1024, None].to(device), examples["condition"][i : i + 1024].to(device)
            )[:, 0].cpu()
            for i in range(0, len(examples["latents"]), 1024)
        ]
    )
    accepted, cleared = odds >= 0, examples["cleared"].bool()
    return {
        "filter_accuracy": (accepted == cleared).float().mean().item(),
        "cleared": cleared.float().mean().item(),
        "filter_precision": cleared[accepted].float().mean().item() if accepted.any() else 0.0,
        "filter_recall": accepted[cleared].float().mean().item() if cleared.any() else 0.0,
    }


def train_latent_filter(
    *,
    run_dir: Path,
    generator: OneStepGenerator,
    tokenizer: VQTokenizer,
    conditioner: Conditioner,
    reward: Reward,
    network: FilterNetwork,
    training: FilterTraining,
    device: torch.device,
) -> OneStepGenerator:
    """The generator, unchanged, with a latent filter fitted to its images' rewards; its settings' `proposals` say how
    many latents the filter chooses among."""
    if generator.prior is None:
        raise ValueError("a latent filter chooses among a layout prior's proposals: fit a prior first")
    torch.manual_seed(training.seed)
    model, prior = generator.model.to(device).eval(), generator.prior.to(device).eval()
    body = replace(
        small_body(model.cfg, width=network.width, depth=network.depth, heads=network.heads, tokens=network.slots),
        latent_dim=model.cfg.latent_dim,
    )
    latent_filter = LatentFilter(LatentFilterConfig(body=body, reward=reward.name, bar=training.bar)).to(device)
    tokenizer = tokenizer.to(device).eval()
    drawing = OneStepGenerator(model, generator.settings, prior)  # one proposal per stream, unfiltered
    optimizer = torch.optim.AdamW(
        latent_filter.parameters(), lr=training.lr, betas=(0.9, 0.95), weight_decay=training.weight_decay
    )

    examples = _examples(Path(run_dir) / EXAMPLES, drawing, tokenizer, conditioner, reward, training, device)
    train, held_out = _split(examples, training)

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        g = torch.Generator().manual_seed(training.seed * 1_000_003 + step)
        rows = torch.randint(len(train["latents"]), (training.batch_size,), generator=g)
        latent_filter.train()
        odds = latent_filter.log_odds(train["latents"][rows, None].to(device), train["condition"][rows].to(device))
        loss = F.binary_cross_entropy_with_logits(odds[:, 0], train["cleared"][rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(latent_filter.parameters(), 1.0)
        optimizer.step()
        latent_filter.eval()
        return {"loss": loss.item()}

    def eval_fn(step: int) -> dict[str, float]:
        return filter_metrics(latent_filter, held_out, device) | loop.one_step_metrics(
            filtered, tokenizer, conditioner, eval_prompts
        )

    filtered = OneStepGenerator(model, generator.settings, prior, latent_filter)
    eval_prompts = loop.training_eval_prompts(training.eval_prompts, conditioner.kinds)
    loop.run(
        run_dir=run_dir,
        modules={"latent_filter": latent_filter},
        optimizers={"latent_filter": optimizer},
        step_fn=step_fn,
        steps=training.steps,
        eval_fn=eval_fn,
        eval_every=training.eval_every,
        description="latent filter",
    )
    latent_filter.eval()
    return filtered
