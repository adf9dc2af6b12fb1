"""Training stages: the layout prior of a one-step generator with a layout latent (softdimo/layout_prior.py).

Fitting (`train_prior`): the latent stage's encoder maps each of the world's images to a posterior over the
latent. The prior's components are the posteriors of `components` images drawn once; their weights, read from the
conditioning, are fitted by maximum likelihood to the posterior means of fresh images of each prompt, the encoder
and generator left as they are. Means rather than draws of the posteriors: a posterior's spread also covers
directions the generator does not read; how far a draw strays from a component's mean is
`GeneratorSettings.latent_scale`.

Tuning (`tune_prior`): a latent is read relative to the prompt (the encoder reads both), so a component placed at
an image of two objects sits among those of three-object images, and likelihood cannot tell the prompts it suits
apart. Tuning asks the generator: each prompt's weights move towards the components whose images the reward
scores highest for it (a policy gradient over the discrete choice of component), held near the fitted weights by
a KL term. Components, generator and reward stay as they are."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
    *,
    run_dir: Path,
    generator: OneStepGenerator,
    encoder: LayoutEncoder,
    tokenizer: VQTokenizer,
    conditioner: Conditioner,
    network: PriorNetwork,
    training: PriorTraining,
    device: torch.device,
) -> OneStepGenerator:
    """The generator, unchanged, with a layout prior fitted to `encoder`'s posterior means."""
    torch.manual_seed(training.seed)
    body = small_body(generator.cfg, width=network.width, depth=network.depth, heads=network.heads, tokens=1)
    prior = LayoutPrior(
        LayoutPriorConfig(body=body, latent_dim=generator.cfg.latent_dim, components=network.components)
    ).to(device)
    generator = OneStepGenerator(generator.model.to(device).eval(), generator.settings, prior)
    encoder = encoder.to(device).eval().requires_grad_(False)
    tokenizer = tokenizer.to(device).eval()
    with torch.no_grad():  # the components: as many encoded images (a run that resumes loads its own)
        tokens, condition = training_batch(
            rng=np.random.default_rng([training.seed, 0, 0]),
            size=network.components,
            conditioner=conditioner,
            tokenizer=tokenizer,
            device=device,
            placement=training.placement,
        )
        means, log_vars = encoder(tokens, condition)
        prior.place(means, 0.5 * log_vars)
    optimizer = torch.optim.AdamW(
        prior.parameters(), lr=training.lr, betas=(0.9, 0.95), weight_decay=training.weight_decay
    )

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        rng = np.random.default_rng([training.seed, step])
        tokens, condition = training_batch(
            rng=rng,
            size=training.batch_size,
            conditioner=conditioner,
            tokenizer=tokenizer,
            device=device,
            placement=training.placement,
        )
        with torch.no_grad():
            means, _ = encoder(tokens, condition)
        nll = -prior.log_likelihood(means, condition).mean() / means.shape[1]
        optimizer.zero_grad(set_to_none=True)
        nll.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        return {"nll_per_dim": nll.item()}

    return _run(run_dir, generator, tokenizer, conditioner, optimizer, step_fn, training, "layout prior")


def _run(
    run_dir, generator, tokenizer, conditioner, optimizer, step_fn, training, description: str
) -> OneStepGenerator:
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
    steps: int = 300
    prompts: int = 32  # prompts a step
    samples: int = 8  # components drawn per prompt, each drawn into an image and scored
    lr: float = 3e-4
    warmup: int = 20
    kl_weight: float = 0.1  # KL(tuned weights || fitted weights) per prompt
    seed: int = 0
    eval_every: int = 100
    eval_prompts: int = 100


def component_rewards(
    generator: OneStepGenerator,
    tokenizer: VQTokenizer,
    reward: Reward,
    condition: torch.Tensor,
    texts: list[str],
    chosen: torch.Tensor,
    noise: ImageNoise,
) -> torch.Tensor:
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


def tune_prior(
    *,
    run_dir: Path,
    generator: OneStepGenerator,
    tokenizer: VQTokenizer,
    conditioner: Conditioner,
    reward: Reward,
    training: PriorTuning,
    device: torch.device,
) -> OneStepGenerator:
    """The generator, unchanged, with its layout prior's weights tuned by `reward` (its components stay)."""
    if generator.prior is None:
        raise ValueError("tuning a layout prior needs a generator with one: fit it first (train_prior)")
    torch.manual_seed(training.seed)
    generator.model.to(device).eval().requires_grad_(False)
    prior = generator.prior.to(device)
    fitted = copy.deepcopy(prior).eval().requires_grad_(False)
    tokenizer = tokenizer.to(device).eval()
    optimizer = torch.optim.AdamW(prior.parameters(), lr=training.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        rng = np.random.default_rng([training.seed, step])
        drawn = [conditioner.for_prompt(shapes.sample_prompt(rng, conditioner.kinds)) for _ in range(training.prompts)]
        condition = torch.cat([c for c, _ in drawn]).to(device)
        log_weights, _, _ = prior.mixture(condition)
        g = torch.Generator().manual_seed(training.seed * 1_000_003 + step)
        chosen = torch.multinomial(
            log_weights.detach().exp().cpu(), training.samples, replacement=True, generator=g
        ).to(device)
        noise = ImageNoise(rng.integers(0, 2**62, size=training.prompts * training.samples).tolist(), device)
        with torch.no_grad():
            scores = component_rewards(generator, tokenizer, reward, condition, [t for _, t in drawn], chosen, noise)
        advantage = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-3)
        policy = -(advantage * log_weights.gather(1, chosen)).mean()
        with torch.no_grad():
            reference, _, _ = fitted.mixture(condition)
        kl = (log_weights.exp() * (log_weights - reference)).sum(-1).mean()
        loss = policy + training.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # how many components a prompt's weights spread over, as exp(entropy)
            in_use = (-(log_weights.exp() * log_weights).sum(-1)).exp().mean()
        return {"reward": scores.mean().item(), "kl": kl.item(), "components_in_use": in_use.item()}

    return _run(run_dir, generator, tokenizer, conditioner, optimizer, step_fn, training, "layout prior tuning")
