"""One-step generator: Di[M]O's noisy hybrid input, plus a layout latent where the model has one -> logits ->
sampled tokens and soft embeddings."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from softdimo.layout_prior import LayoutPrior
from softdimo.seeding import ImageNoise
from softdimo.transformer import MaskedTransformer, perturb_embeddings


@dataclass(frozen=True)
class GeneratorSettings:
    r_init: float = 0.6  # share of input tokens replaced by the mask token (the rest are uniform random)
    sigma: float = 0.1  # Gaussian noise on the input embeddings: e <- sigma * eps + sqrt(1 - sigma^2) * e
    temperature: float = 1.0  # sampling temperature of output tokens; 0 takes the argmax
    # a model with a layout latent draws it from its layout prior, each component's spread times latent_scale (from
    # N(0, latent_scale^2) without a prior): below 1, likelier layouts
    latent_scale: float = 1.0
    # a layout prior's component weights are drawn as weights^(1 / prior_temperature): above 1, flatter, so a prompt's
    # images spread over more of its layouts
    prior_temperature: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


class OneStepGenerator:
    """A transformer of the teacher's architecture used in one step: seeds -> input embeddings -> logits.

    Every random draw is made per image from its own seed, so an image never depends on its batch-mates."""

    def __init__(self, model: MaskedTransformer, settings: GeneratorSettings, prior: LayoutPrior | None = None):
        if prior is not None and prior.cfg.latent_dim != model.cfg.latent_dim:
            raise ValueError(f"a layout prior of {prior.cfg.latent_dim} numbers for a latent of {model.cfg.latent_dim}")
        self.model = model
        self.settings = settings
        self.prior = prior  # where the layout latent is drawn from; None: the standard normal

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def initial_tokens(self, noise: ImageNoise) -> torch.Tensor:
        """Uniform random tokens with exactly round(N * r_init) positions set to the mask token: (B, N)."""
        n, k = self.cfg.tokens, self.cfg.codebook_size
        tokens = noise.randint(k, n)
        masked_count = round(n * self.settings.r_init)
        order = noise.permutation_scores(n).argsort(-1)
        masked = torch.zeros_like(tokens, dtype=torch.bool).scatter(1, order[:, :masked_count], True)
        return torch.where(masked, self.cfg.mask_id, tokens)

    def token_embeddings(self, noise: ImageNoise) -> torch.Tensor:
        """The input's first part: embedded hybrid tokens plus Gaussian noise (B, N, D), on the model's device."""
        return self.noisy_embeddings(self.initial_tokens(noise).to(self.device), noise)

    def noisy_embeddings(self, tokens: torch.Tensor, noise: ImageNoise) -> torch.Tensor:
        """Tokens (B, N) on the model's device -> their embeddings plus the generator's Gaussian noise (B, N, D)."""
        eps = noise.randn(self.cfg.tokens, self.cfg.width).to(self.device)
        return perturb_embeddings(self.model.embed(tokens), self.settings.sigma, eps)

    def layout_latent(self, noise: ImageNoise, condition: torch.Tensor) -> torch.Tensor | None:
        """The layout latent (B, latent_dim) drawn for the conditioning, on the model's device; None without one."""
        return None if not self.cfg.latent_dim else self.layout_latents(noise, condition)[:, 0]

    def layout_latents(
        self, noise: ImageNoise, condition: torch.Tensor, count: int = 1, prior_temperature: float | None = None
    ) -> torch.Tensor:
        """`count` layout latents per image (B, count, latent_dim), from its prior (flattened by `prior_temperature`,
        else the settings') or the standard normal; the first is the one `layout_latent` draws."""
        settings = self.settings
        if self.prior is None:
            return settings.latent_scale * noise.randn(count, self.cfg.latent_dim).to(self.device)
        temperature = settings.prior_temperature if prior_temperature is None else prior_temperature
        return self.prior.sample(
            condition.to(self.device), noise, scale=settings.latent_scale, temperature=temperature, count=count
        )

    def input_parts(self, noise: ImageNoise, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The input's two parts: `token_embeddings`, then `layout_latent`; both on the model's device."""
        embeddings = self.token_embeddings(noise)
        return embeddings, self.layout_latent(noise, condition)

    def with_latent(self, embeddings: torch.Tensor, latent: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings from the parts `input_parts` gives (or a latent put in the drawn one's place)."""
        return embeddings if latent is None else embeddings + self.model.latent_embeddings(latent)

    def initial_embeddings(
        self, noise: ImageNoise, condition: torch.Tensor, latent: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The generator's input (B, N, D): `input_parts` put together; `latent`, when given, replaces the drawn one."""
        embeddings, drawn = self.input_parts(noise, condition)
        return self.with_latent(embeddings, drawn if latent is None else latent)

    def logits(self, embeddings: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, N, D) -> output logits (B, N, K); differentiable in both weights and input."""
        return self.model.forward_embeddings(embeddings, condition)

    def token_noise(self, noise: ImageNoise) -> torch.Tensor:
        """The Gumbel noise (B, N, K) that turns logits into sampled tokens; drawn after the input noise."""
        return noise.gumbel(self.cfg.tokens, self.cfg.codebook_size).to(self.device)

    def tokens_from(self, logits: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
        """Tokens drawn from softmax(logits / temperature) with given Gumbel noise; argmax at temperature 0."""
        if self.settings.temperature <= 0:
            return logits.argmax(-1)
        return (logits.float() / self.settings.temperature + gumbel).argmax(-1)

    @torch.inference_mode()
    def generate_tokens(self, condition: torch.Tensor, noise: ImageNoise) -> torch.Tensor:
        """One forward pass: conditioning (B, ...) -> tokens (B, N)."""
        condition = condition.to(self.device)
        logits = self.logits(self.initial_embeddings(noise, condition), condition)
        return self.tokens_from(logits, self.token_noise(noise))
