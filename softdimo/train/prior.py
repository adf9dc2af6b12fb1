"""Training stages: the layout prior of a one-step generator with a layout latent (softdimo/layout_prior.py).

Fitting (`train_prior`): the latent stage's encoder maps each of the world's images to a posterior over the
latent. The prior's components are the posteriors of `components` images drawn once; their weights, read from the
conditioning, are fitted by maximum likelihood to the posterior means of fresh images of each prompt, the encoder
and generator left as they are. Means rather than draws of the posteriors: a posterior's spread also covers
directions the generator does not read; how far a draw strays from a component's mean is
`GeneratorSettings.latent_scale`.

Tuning (`tune_prior`): a latent is read relative to the prompt (the encoder reads both), so a component placed at
an image of two objects sits among those of three-object images, and likelihood cannot tell the prompts it suits
apart. Tuning asks the generator: each prompt's weights move to softmax(reward / temperature) over the components,
the reward of the image the generator draws from each. That is the distribution that maximises the expected reward
plus temperature times the entropy of the choice: every component whose image the reward scores as well as the best
keeps as much weight, so a prompt keeps as many layouts as the generator draws right, and a component the reward
scores well below them loses its weight. It is learnt from a few components proposed per prompt and step, whose
renormalised weights are fitted to the softmax of their rewards: the weights of every proposed set agree with
their target only at the softmax over all components, however the sets are drawn. They are drawn from the current
weights, so that components it favours are compared with one another, mixed with uniform ones, so that every
component is tried. Components, generator and reward stay as they are."""

from __future__ import annotations

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
    steps: int = 300
    prompts: int = 32  # prompts a step
    samples: int = 16  # components proposed per prompt, each drawn into an image and scored
    explore: float = 0.5  # proposals are drawn, without replacement, from (1 - explore) * weights + explore * uniform
    temperature: float = 0.2  # in the reward's units: weights -> softmax(reward / temperature) over the components
    lr: float = 1e-3
    warmup: int = 20
    seed: int = 0
    eval_every: int = 100
    eval_prompts: int = 100


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
    components = prior.cfg.components

    def step_fn(step: int) -> dict[str, float]:
        loop.set_lr(optimizer, loop.cosine_lr(step, training.steps, training.lr, training.warmup))
        rng = np.random.default_rng([training.seed, step])
        drawn = [conditioner.for_prompt(shapes.sample_prompt(rng, conditioner.kinds)) for _ in range(training.prompts)]
        condition = torch.cat([c for c, _ in drawn]).to(device)
        log_weights, _, _ = prior.mixture(condition)
        noise = ImageNoise(rng.integers(0, 2**62, size=training.prompts * training.samples).tolist(), device)
        uniform = torch.full_like(log_weights, training.explore / components).log()
        proposal = torch.logaddexp(log_weights.detach() + torch.tensor(1 - training.explore).log(), uniform)
        gumbel = torch.from_numpy(rng.gumbel(size=proposal.shape)).to(proposal)
        proposed = (proposal + gumbel).topk(training.samples, dim=-1).indices  # (B, M), without replacement
        with torch.no_grad():
            scores = component_rewards(generator, tokenizer, reward, condition, [t for _, t in drawn], proposed, noise)
        target = (scores / training.temperature).softmax(-1)  # (B, M)
        log_proposed = log_weights.gather(1, proposed).log_softmax(-1)  # the weights renormalised over the proposals
        loss = -(target * log_proposed).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            entropy = -(log_weights.exp() * log_weights).sum(-1).mean()
        return {"reward": scores.mean().item(), "loss": loss.item(), "components_in_use": entropy.exp().item()}

    return _run(run_dir, generator, tokenizer, conditioner, optimizer, step_fn, training, "layout prior tuning")
