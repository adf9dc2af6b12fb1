"""Bidirectional masked transformer over image tokens, conditioned on prompt tokens or a class label."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02  # the spread every weight and embedding starts at


@dataclass(frozen=True)
class TransformerConfig:
    codebook_size: int = 1000  # image-token vocabulary; id `codebook_size` is the mask token
    tokens: int = 64  # image tokens per image (a flattened grid)
    # The shipped text teacher's size (recipes/shapes-teacher-text.toml); every recipe states its own.
    width: int = 192
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    text_vocab: int = 0  # > 0: text-conditional, prompts arrive as `text_length` word ids (0 = padding)
    text_length: int = 12
    num_classes: int = 0  # > 0: class-conditional; label `num_classes` is the null (unconditional) class
    dropout: float = 0.0
    # > 0: the tokenizer's code vectors (codebook_size, code_dim) ride along as a buffer, and every token's
    # input embedding and output logit get a learned function of its code vector, so tokens whose codes lie
    # close share what is learned about them instead of each being learned from its own occurrences alone.
    code_dim: int = 0
    # > 0: a one-step generator's layout latent, a Gaussian vector of this size that `latent_input` maps to an
    # embedding at every image position, added to the input: one draw the whole image can read its layout from.
    latent_dim: int = 0

    def __post_init__(self):
        if (self.text_vocab > 0) == (self.num_classes > 0):
            raise ValueError("a transformer is conditioned on text (text_vocab > 0) or on classes (num_classes > 0)")

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def state_width(self) -> int:
        """Width of the hidden states `hidden_states` returns (the discriminator heads' input)."""
        return self.width

    @property
    def conditioning(self) -> str:
        return "text" if self.text_vocab else "class"

    @property
    def prefix_length(self) -> int:
        return self.text_length if self.text_vocab else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TransformerConfig:
        return cls(**d)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d/h)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # no causal mask
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.net = nn.Sequential(
            nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width), nn.Dropout(cfg.dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def perturb_embeddings(embeddings: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """Di[M]O's embedding noise: e <- sigma * eps + sqrt(1 - sigma^2) * e."""
    return sigma * noise + math.sqrt(1.0 - sigma**2) * embeddings


def _code_features(cfg: TransformerConfig) -> nn.Module:
    return nn.Sequential(nn.Linear(cfg.code_dim, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.width))


class MaskedTransformer(nn.Module):
    """Token ids or input embeddings (B, N, D) plus conditioning -> logits (B, N, codebook_size).

    The input table `token_embedding` has codebook_size + 1 rows (the last is the mask token), so a
    distribution over the codebook can be fed as its expected embedding (`soft_embed`)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.codebook_size + 1, cfg.width)
        self.position = nn.Parameter(torch.zeros(1, cfg.prefix_length + cfg.tokens, cfg.width))
        if cfg.text_vocab:
            self.condition_embedding = nn.Embedding(cfg.text_vocab, cfg.width)
        else:
            self.condition_embedding = nn.Embedding(cfg.num_classes + 1, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.codebook_size)
        if cfg.code_dim:
            self.register_buffer("code_vectors", torch.zeros(cfg.codebook_size, cfg.code_dim))
            self.code_in = _code_features(cfg)
            self.code_out = _code_features(cfg)
        if cfg.latent_dim:
            self.latent_input = nn.Linear(cfg.latent_dim, cfg.tokens * cfg.width)
        self.apply(self._init)
        nn.init.normal_(self.position, std=INIT_STD)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def init_grid_positions(self) -> None:
        """Start the image positions as a 2-D sine-cosine grid (half the width encodes the row, half the column)
        at the scale of a random embedding, so that neighbouring positions start alike instead of unrelated."""
        side = math.isqrt(self.cfg.tokens)
        if side * side != self.cfg.tokens or self.cfg.width % 4:
            raise ValueError(
                "a grid start needs a square token grid and a width divisible by 4: "
                f"{self.cfg.tokens}, {self.cfg.width}"
            )
        half = self.cfg.width // 2
        frequencies = 10000.0 ** -(torch.arange(half // 2) / (half // 2))
        angles = torch.arange(side)[:, None] * frequencies[None]
        axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (side, half)
        grid = torch.cat([axis[:, None].expand(side, side, half), axis[None].expand(side, side, half)], dim=-1)
        with torch.no_grad():
            self.position[0, self.cfg.prefix_length :] = (
                grid.reshape(self.cfg.tokens, self.cfg.width) * INIT_STD * math.sqrt(2)
            )

    def null_condition(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """The unconditional input used for classifier-free guidance."""
        if self.cfg.text_vocab:
            return torch.zeros(batch, self.cfg.text_length, dtype=torch.long, device=device)
        return torch.full((batch,), self.cfg.num_classes, dtype=torch.long, device=device)

    def set_code_vectors(self, codebook: torch.Tensor) -> None:
        """Give the model its tokenizer's codebook (codebook_size, code_dim) before training."""
        self.code_vectors.copy_(codebook)

    def input_table(self) -> torch.Tensor:
        """The input embedding of every token id, (codebook_size + 1, D); the last row is the mask token's."""
        table = self.token_embedding.weight
        if not self.cfg.code_dim:
            return table
        return table + F.pad(self.code_in(self.code_vectors), (0, 0, 0, 1))

    def input_parameters(self) -> list[nn.Parameter]:
        """The parameters that make input embeddings (what a student keeps from its teacher)."""
        return [self.token_embedding.weight, self.position, *(self.code_in.parameters() if self.cfg.code_dim else ())]

    def mask_embedding(self) -> torch.Tensor:
        return self.input_table()[self.cfg.mask_id]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N), mask id allowed -> input embeddings (B, N, D)."""
        return F.embedding(tokens, self.input_table())

    def latent_embeddings(self, latent: torch.Tensor) -> torch.Tensor:
        """Layout latents (B, latent_dim) -> what they add to the input embeddings, (B, N, D)."""
        return self.latent_input(latent).view(latent.shape[0], self.cfg.tokens, self.cfg.width)

    def soft_embed(self, probs: torch.Tensor) -> torch.Tensor:
        """Distributions over the codebook (B, N, K) -> expected input embeddings (B, N, D)."""
        return probs @ self.input_table()[: self.cfg.codebook_size]

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        h = self.norm(states)
        logits = self.head(h)
        if self.cfg.code_dim:
            logits = logits + h @ self.code_out(self.code_vectors).T
        return logits

    def _sequence(self, embeddings: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        prefix = self.condition_embedding(condition)  # (B, L, D) for text
        if prefix.dim() == 2:
            prefix = prefix[:, None]  # (B, 1, D) for a class
        return torch.cat([prefix, embeddings], dim=1) + self.position  # (B, L + N, D)

    def forward_embeddings(self, embeddings: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, N, D) and conditioning -> logits (B, N, K)."""
        x = self._sequence(embeddings, condition)
        for block in self.blocks:
            x = block(x)
        return self._logits(x[:, self.cfg.prefix_length :])

    def hidden_states(
        self, embeddings: torch.Tensor, condition: torch.Tensor, layers: tuple[int, ...]
    ) -> list[torch.Tensor]:
        """The image-token states (B, N, D) after each block in `layers` (0-based), for discriminator heads."""
        x = self._sequence(embeddings, condition)
        states = []
        for i, block in enumerate(self.blocks[: max(layers) + 1]):
            x = block(x)
            if i in layers:
                states.append(x[:, self.cfg.prefix_length :])
        return states

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N) and conditioning -> logits (B, N, K)."""
        return self.forward_embeddings(self.embed(tokens), condition)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
