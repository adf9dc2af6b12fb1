"""The latent filter: which layout latents a one-step generator draws right, judged before it draws them.

A layout prior spread over many of a prompt's layouts also proposes latents that the generator draws wrong (pieces
of two layouts, an object missing); a prior narrowed to the latents it draws right keeps only a few layouts per
prompt. The filter keeps the spread: the generator's prior proposes several latents per image, the filter predicts
for each whether the generator's image of it clears a reward bar, and the first one it accepts is drawn (the likeliest
when it accepts none). Accepting the first, not the best, keeps the proposals' variety: every accepted latent is as
likely as the prior made it, however much the reward prefers some layouts to others. The filter reads only the
conditioning and the latent, a small transformer, so choosing among proposals costs little beside one forward pass of
the generator (softdimo/train/latent_filter.py fits it to the generator's images, scored by the reward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from softdimo.transformer import MaskedTransformer, TransformerConfig


@dataclass(frozen=True)
class LatentFilterConfig:
    body: TransformerConfig  # reads the conditioning and `body.tokens` slots, the latent added to them
    reward: str  # the reward whose bar it predicts
    bar: float  # the reward an image must reach to count as drawn right

    def to_dict(self) -> dict:
        return {"body": self.body.to_dict(), "reward": self.reward, "bar": self.bar}

    @classmethod
    def from_dict(cls, d: dict) -> LatentFilterConfig:
        return cls(body=TransformerConfig.from_dict(d["body"]), reward=d["reward"], bar=d["bar"])


class LatentFilter(nn.Module):
    """(conditioning, latent) -> the log-odds that the generator's image of the latent clears the reward bar."""

    def __init__(self, cfg: LatentFilterConfig):
        super().__init__()
        if not cfg.body.latent_dim:
            raise ValueError("a latent filter's body reads a latent: give it latent_dim > 0")
        self.cfg = cfg
        self.body = MaskedTransformer(cfg.body)
        self.head = nn.Linear(cfg.body.width, 1)

    @property
    def latent_dim(self) -> int:
        return self.cfg.body.latent_dim

    def log_odds(self, latents: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Latents (B, P, L), P proposals for each of B images, and their conditioning (B, ...) -> (B, P)."""
        b, p, _ = latents.shape
        body = self.cfg.body
        condition = condition.repeat_interleave(p, 0)
        masked = torch.full((b * p, body.tokens), body.mask_id, dtype=torch.long, device=latents.device)
        inputs = self.body.embed(masked) + self.body.latent_embeddings(latents.flatten(0, 1).to(masked.device))
        (states,) = self.body.hidden_states(inputs, condition, (body.depth - 1,))
        return self.head(states.mean(1)).float().view(b, p)

    @torch.no_grad()
    def choose(self, latents: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Each image's first proposal the filter accepts (log-odds >= 0), else its likeliest: (B, P, L) -> (B, L)."""
        odds = self.log_odds(latents, condition)
        accepted = odds >= 0
        first = accepted.float().argmax(-1)  # the first True; 0 when none is
        pick = torch.where(accepted.any(-1), first, odds.argmax(-1))
        return latents[torch.arange(len(pick), device=latents.device), pick]
