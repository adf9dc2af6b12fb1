"""The layout prior: where a one-step generator draws its layout latent from, given the conditioning.

A layout latent fitted as a conditional VAE (softdimo/train/latent.py) is trained against a standard normal, but
the encoder's posteriors for the world's images do not fill it: a draw from N(0, I) often lands between two
layouts, and the generator then draws pieces of both (a square beside its own copy, a two-patch rectangle, three
objects asked for and two drawn). This prior is a mixture of the encoder's posteriors for a fixed set of the
world's images (its components, the same for every prompt), weighted by a small transformer that reads the
conditioning. The weights are fitted to where the encoder puts the images of each prompt (softdimo/train/prior.py),
so a draw is a layout the generator has learnt to draw, chosen for the prompt."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from softdimo.seeding import ImageNoise
from softdimo.transformer import MaskedTransformer, TransformerConfig

MIN_LOG_STD = -6.0  # a component's spread is at least e^-6 in every dimension
MAX_LOG_STD = 2.0


def small_body(
    like: TransformerConfig, *, width: int, depth: int, heads: int, tokens: int | None = None
) -> TransformerConfig:
    """A small transformer that reads the same image tokens (or `tokens` positions of them) and conditioning as
    `like`: the layout encoder's body, and the layout prior's, which reads the conditioning and one masked slot."""
    return replace(like, width=width, depth=depth, heads=heads, code_dim=0, latent_dim=0, tokens=tokens or like.tokens)


@dataclass(frozen=True)
class LayoutPriorConfig:
    body: TransformerConfig
    latent_dim: int
    components: int

    def to_dict(self) -> dict:
        return {"body": self.body.to_dict(), "latent_dim": self.latent_dim, "components": self.components}

    @classmethod
    def from_dict(cls, d: dict) -> LayoutPriorConfig:
        return cls(body=TransformerConfig.from_dict(d["body"]), latent_dim=d["latent_dim"], components=d["components"])


class LayoutPrior(nn.Module):
    """p(latent | conditioning): a mixture of `components` diagonal Gaussians (K, L), the same for every prompt
    and fixed once placed (`place`), weighted per prompt. The body reads the conditioning and masked image
    positions (one is enough: nothing is known of the image); the mean of their states gives the weights."""

    def __init__(self, cfg: LayoutPriorConfig):
        super().__init__()
        self.cfg = cfg
        self.body = MaskedTransformer(cfg.body)
        self.weights = nn.Linear(cfg.body.width, cfg.components)
        self.register_buffer("means", torch.zeros(cfg.components, cfg.latent_dim))
        self.register_buffer("log_stds", torch.zeros(cfg.components, cfg.latent_dim))

    @torch.no_grad()
    def place(self, means: torch.Tensor, log_stds: torch.Tensor) -> None:
        """Put the components at given Gaussians (K, L) each: the encoder's posteriors of K images."""
        self.means.copy_(means)
        self.log_stds.copy_(log_stds.clamp(MIN_LOG_STD, MAX_LOG_STD))

    def mixture(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conditioning (B, ...) -> log weights (B, K), means (B, K, L), log spreads (B, K, L)."""
        b, body = condition.shape[0], self.cfg.body
        masked = torch.full((b, body.tokens), body.mask_id, dtype=torch.long, device=condition.device)
        (states,) = self.body.hidden_states(self.body.embed(masked), condition, (body.depth - 1,))
        log_weights = self.weights(states.mean(1)).float().log_softmax(-1)
        return log_weights, self.means.float().expand(b, -1, -1), self.log_stds.float().expand(b, -1, -1)

    def log_likelihood(self, latent: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """log p(latent | conditioning) for latents (B, L) -> (B,)."""
        log_weights, means, log_stds = self.mixture(condition)
        z = (latent.float()[:, None] - means) * (-log_stds).exp()
        per_component = (-0.5 * z**2 - log_stds).sum(-1) - 0.5 * self.cfg.latent_dim * math.log(2 * math.pi)
        return torch.logsumexp(log_weights + per_component, dim=-1)

    def sample(
        self, condition: torch.Tensor, noise: ImageNoise, scale: float = 1.0, temperature: float = 1.0, count: int = 1
    ) -> torch.Tensor:
        """`count` latents (B, count, L) per image from its own seed: each a component by its weight (raised to
        1 / `temperature`), then a point of it, the spread times `scale`."""
        log_weights, means, log_stds = self.mixture(condition)
        device = means.device
        k = (log_weights[:, None] / temperature + noise.gumbel(count, self.cfg.components).to(device)).argmax(-1)
        rows = torch.arange(len(k), device=device)[:, None]
        eps = noise.randn(count, self.cfg.latent_dim).to(device)
        return means[rows, k] + scale * log_stds[rows, k].exp() * eps
