"""Training stages: the layout prior of a one-step generator with a layout latent (softdimo/layout_prior.py).

Fitting (`train_prior`): the latent stage's encoder maps each of the world's images to a posterior over the
latent. The prior's components are the posteriors of `components` images drawn once; their weights, read from the
conditioning, are fitted by maximum likelihood to the posterior means of fresh images of each prompt, the encoder
and generator left as they are. Means rather than draws of the posteriors: a posterior's spread also covers
directions the generator does not read; how far a draw strays from a component's mean is
`GeneratorSettings.latent_scale`.

Tuning (`tune_prior`): a latent is read relative to the prompt (the encoder reads both), so a component placed at
an image of two objects sits among those of three-object images, and likelihood cannot tell the prompts it suits
apart. Tuning asks the generator: every component is drawn into an image and scored by the reward once for each
of a set of prompts (a table), and each prompt's weights are fitted, by cross-entropy over all components, to an
even spread over the share `keep` of its components that scored best. Even, not by reward: among the components
that draw a prompt right the reward's order is noise, and weighting by it concentrates a prompt on a few layouts.
Which components draw right depends on the prompt's structure (kinds, counts, the axis of a relation) far more
than on its colours and shapes, so the weights learnt for the table's prompts carry over to others. Components,
generator and reward stay as they are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from softdimo import shapes
from softdimo.conditioning import Conditioner
from softdimo.generator import OneStepGenerator
from softdimo.layout_prior import LayoutPrior, LayoutPriorConfig, small_body
from softdimo.reward import Reward
from softdimo.seeding import ImageNoise
from softdimo.train import loop
from softdimo.train.latent import LayoutEncoder
from softdimo.train.teacher import training_batch
from softdimo.vq import VQTokenizer


@dataclass(frozen=True)
class PriorNetwork:
    components: int = 1024
    width: int = 128
    depth: int = 2
    heads: int = 4


@dataclass(frozen=True)
class PriorTraining:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 500
    eval_prompts: int = 100
    placement: str = "grid"  # where the world's objects sit (shapes.PLACEMENTS)


def train_prior(
    *, run_dir: Path, generator: OneStepGenerator, encoder: LayoutEncoder, tokenizer: VQTokenizer, conditioner: Conditioner,
    network: PriorNetwork, training: PriorTraining, device: torch.device,
) -> OneStepGenerator:  # fmt: skip
    """The generator, unchanged, with a layout prior fitted to `encoder`'s posterior means."""
    torch.manual_seed(training.seed)
    body = small_body(generator.cfg, width=network.width, depth=network.depth, heads=network.heads, tokens=1)
    prior = LayoutPrior(LayoutPriorConfig(body=body, latent_dim=generator.cfg.latent_dim, components=network.components)).to(device)
    generator = OneStepGenerator(generator.model.to(device).eval(), generator.settings, prior)
    encoder = encoder.to(device).eval().requires_grad_(False)
    tokenizer = tokenizer.to(device).eval()
    with torch.no_grad():  # the components: as many encoded images (a run that resumes loads its own)
        tokens, condition = training_batch(
            rng=np.random.default_rng([training.seed, 0, 0]), size=network.components, conditioner=conditioner, tokenizer=tokenizer,
            device=device, placement=training.placement,
        )  # fmt: skip
        means, log_vars = encoder(tokens, condition)
        prior.place(means, 0.5 * log_vars)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=training.lr, betas=(0.9, 0.95), weight_decay=training.weight_decay)

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        rng = np.random.default_rng([training.seed, step])
        tokens, condition = training_batch(
            rng=rng, size=training.batch_size, conditioner=conditioner, tokenizer=tokenizer, device=device, placement=training.placement,
        )  # fmt: skip
        with torch.no_grad():
            means, _ = encoder(tokens, condition)
        nll = -prior.log_likelihood(means, condition).mean() / means.shape[1]
        optimizer.zero_grad(set_to_none=True)
        nll.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        return {"nll_per_dim": nll.item()}

    return _run(run_dir, generator, tokenizer, conditioner, optimizer, step_fn, training, "layout prior")


def _run(run_dir, generator, tokenizer, conditioner, optimizer, step_fn, training, description: str) -> OneStepGenerator:
    """A prior stage's steps on the prior's weights, the generator evaluated as it draws from the prior."""
    eval_prompts = loop.training_eval_prompts(training.eval_prompts, conditioner.kinds)
    loop.run(
        run_dir=run_dir,
        modules={"prior": generator.prior},
        optimizers={"prior": optimizer},
        step_fn=step_fn,
        steps=training.steps,
        eval_fn=lambda step: loop.one_step_metrics(generator, tokenizer, conditioner, eval_prompts),
        eval_every=training.eval_every,
        description=description,
    )
    generator.prior.eval()
    return generator


@dataclass(frozen=True)
class PriorTuning:
    prompts: int = 240  # prompts (an equal share of each kind) whose every component is drawn and scored once
    keep: float = 0.25  # share of a prompt's components, the best scored, among which its weight is spread evenly
    steps: int = 600  # fitting steps, each on `batch` of those prompts
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 20
    seed: int = 0
    eval_every: int = 200
    eval_prompts: int = 100


TABLE_FILE = "reward_table.safetensors"  # in the run folder: a resumed stage scores nothing again


def component_rewards(
    generator: OneStepGenerator, tokenizer: VQTokenizer, reward: Reward, condition: torch.Tensor, texts: list[str],
    chosen: torch.Tensor, noise: ImageNoise,
) -> torch.Tensor:  # fmt: skip
    """The reward of each prompt's image drawn from each chosen component (B, M) -> (B, M): a point of the component
    as the generator draws one (`latent_scale`), one forward pass, the reward of the decoded tokens. `noise` holds
    one stream per image (B * M)."""
    prior, (b, m) = generator.prior, chosen.shape
    eps = noise.randn(prior.cfg.latent_dim).to(chosen.device).view(b, m, -1)
    latent = prior.means[chosen].float() + generator.settings.latent_scale * prior.log_stds[chosen].float().exp() * eps
    condition = condition.repeat_interleave(m, 0)
    embeddings = generator.token_embeddings(noise)  # the latent is the chosen component's, not a draw of the prior
    logits = generator.logits(generator.with_latent(embeddings, latent.flatten(0, 1)), condition)
    tokens = generator.tokens_from(logits, generator.token_noise(noise))
    return reward.score(tokenizer.decode_indices(tokens), [t for t in texts for _ in range(m)]).float().view(b, m)


@torch.no_grad()
def reward_table(
    generator: OneStepGenerator, tokenizer: VQTokenizer, reward: Reward, conditions: torch.Tensor, texts: list[str],
    seed: int, chunk: int = 256,
) -> torch.Tensor:  # fmt: skip
    """The reward of every prompt's image from every component (P, K), component k drawn with the same seed for
    every prompt; scored under bfloat16 autocast, since which components draw a prompt best does not hinge on the
    last bits of a float."""
    components = generator.prior.cfg.components
    seeds = np.random.default_rng(seed).integers(0, 2**62, size=components).tolist()
    rows = []
    for condition, text in zip(conditions, texts):
        row = []
        for start in range(0, components, chunk):
            chosen = torch.arange(start, min(components, start + chunk), device=conditions.device)[None]
            noise = ImageNoise(seeds[start : start + chunk], conditions.device)
            with torch.autocast(conditions.device.type, dtype=torch.bfloat16):
                row.append(component_rewards(generator, tokenizer, reward, condition[None], [text], chosen, noise)[0].float())
        rows.append(torch.cat(row))
    return torch.stack(rows)


def kept_components(table: torch.Tensor, keep: float) -> torch.Tensor:
    """Each prompt's target weights (P, K): even over the `keep` share of its components that scored best, zero
    elsewhere."""
    count = max(1, round(keep * table.shape[1]))
    best = table.topk(count, dim=-1).indices
    return torch.zeros_like(table).scatter_(1, best, 1.0 / count)


def tune_prior(
    *, run_dir: Path, generator: OneStepGenerator, tokenizer: VQTokenizer, conditioner: Conditioner, reward: Reward,
    training: PriorTuning, device: torch.device,
) -> OneStepGenerator:  # fmt: skip
    """The generator, unchanged, with its layout prior's weights tuned by `reward` (its components stay)."""
    if generator.prior is None:
        raise ValueError("tuning a layout prior needs a generator with one: fit it first (train_prior)")
    torch.manual_seed(training.seed)
    generator.model.to(device).eval().requires_grad_(False)
    prior = generator.prior.to(device)
    tokenizer = tokenizer.to(device).eval()
    optimizer = torch.optim.AdamW(prior.parameters(), lr=training.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng([training.seed, 1])
    kinds = conditioner.kinds
    prompts = [shapes.sample_prompt(rng, kinds=(kinds[i % len(kinds)],)) for i in range(training.prompts)]
    conditions = torch.cat([conditioner.for_prompt(p)[0] for p in prompts]).to(device)
    texts = [conditioner.for_prompt(p)[1] for p in prompts]
    table = _stored_table(
        Path(run_dir) / TABLE_FILE, texts,
        lambda rows: reward_table(generator, tokenizer, reward, conditions[rows], texts[rows], seed=training.seed),
    )  # fmt: skip
    targets = kept_components(table.to(device), training.keep)

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        rows = torch.from_numpy(np.random.default_rng([training.seed, 2, step]).choice(len(prompts), training.batch))
        log_weights, _, _ = prior.mixture(conditions[rows])
        loss = -(targets[rows] * log_weights).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # the weight on the kept components, and how many components it spreads over
            kept = (log_weights.exp() * (targets[rows] > 0)).sum(-1).mean()
            in_use = (-(log_weights.exp() * log_weights).sum(-1)).exp().mean()
        return {"loss": loss.item(), "kept_weight": kept.item(), "components_in_use": in_use.item()}

    return _run(run_dir, generator, tokenizer, conditioner, optimizer, step_fn, training, "layout prior tuning")


def _stored_table(
    path: Path, texts: list[str], score: Callable[[slice], torch.Tensor], every: int = 16
) -> torch.Tensor:  # fmt: skip
    """The reward table of these prompts, scored `every` prompts at a time and saved in the run folder after each,
    so that a stopped stage goes on from the last saved prompt (and a finished one scores nothing again)."""
    key = "\n".join(texts)
    table = torch.zeros(0)
    if path.exists():
        with safe_open(path, framework="pt") as saved:
            if saved.metadata().get("prompts") == key:
                table = saved.get_tensor("table")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(texts), initial=len(table), desc="scoring every component", leave=False) as progress:
        while len(table) < len(texts):
            rows = slice(len(table), min(len(texts), len(table) + every))
            scored = score(rows).cpu()
            table = torch.cat([table, scored]) if len(table) else scored
            save_file({"table": table.contiguous()}, path, metadata={"prompts": key})
            progress.update(rows.stop - rows.start)
    return table
