"""The layout prior: a mixture of Gaussians over a one-step generator's layout latent, read from the conditioning."""

import math

import torch

from softdimo.generator import GeneratorSettings, OneStepGenerator
from softdimo.layout_prior import LayoutPrior, LayoutPriorConfig, small_body
from softdimo.seeding import ImageNoise
from softdimo.train.latent import latent_student


def _prior(transformer, latent_dim=2, components=3) -> LayoutPrior:
    torch.manual_seed(0)
    body = small_body(transformer.cfg, width=16, depth=1, heads=2, tokens=1)
    prior = LayoutPrior(LayoutPriorConfig(body=body, latent_dim=latent_dim, components=components)).eval()
    prior.place(torch.randn(components, latent_dim), 0.3 * torch.randn(components, latent_dim))
    return prior


def test_the_likelihood_is_a_density_over_the_latent(tiny_text_transformer, text_conditioner):
    prior = _prior(tiny_text_transformer, latent_dim=2)
    condition = text_conditioner.encode_prompts(["two blue squares"])
    axis = torch.linspace(-12, 12, 481)
    grid = torch.cartesian_prod(axis, axis)  # (481^2, 2)
    with torch.no_grad():
        density = prior.log_likelihood(grid, condition.expand(len(grid), -1)).exp()
    cell = (axis[1] - axis[0]) ** 2
    assert math.isclose((density * cell).sum().item(), 1.0, rel_tol=1e-2)


def test_draws_follow_the_mixture_per_image_and_its_spread_scales(tiny_text_transformer, text_conditioner):
    prior = _prior(tiny_text_transformer)
    condition = text_conditioner.encode_prompts(["a red circle", "a green square above a yellow circle"])
    with torch.no_grad():
        log_weights, means, log_stds = prior.mixture(condition)
        together = prior.sample(condition, ImageNoise([5, 6]))[:, 0]
        alone = prior.sample(condition[1:], ImageNoise([6]))[:, 0]
        at_means = prior.sample(condition, ImageNoise([5, 6]), scale=0.0)[:, 0]
    assert torch.allclose(together[1], alone[0])  # never depends on its batch-mates
    assert not torch.allclose(log_weights[0], log_weights[1])  # the conditioning sets the mixture
    # the component is the Gumbel-max choice of each image's own stream, the point its mean plus spread * normal draw
    replay = ImageNoise([5, 6])
    k = (log_weights + replay.gumbel(3)).argmax(-1)
    eps = replay.randn(2)
    rows = torch.arange(2)
    assert torch.allclose(at_means, means[rows, k])
    assert torch.allclose(together, means[rows, k] + log_stds[rows, k].exp() * eps)


def test_a_generator_with_a_prior_draws_its_latent_from_it(tiny_text_transformer, text_conditioner):
    torch.manual_seed(0)
    generator = OneStepGenerator(
        latent_student(tiny_text_transformer, 2),
        GeneratorSettings(r_init=1.0, sigma=0.0),
        _prior(tiny_text_transformer),
    )
    condition = text_conditioner.encode_prompts(["a red circle", "three cyan triangles"])
    with torch.no_grad():
        embeddings, latent = generator.input_parts(ImageNoise([1, 2]), condition)
        replay = ImageNoise([1, 2])  # the hybrid tokens and embedding noise come first, then the prior's draws
        generator.initial_tokens(replay)
        replay.randn(generator.cfg.tokens, generator.cfg.width)
        assert torch.allclose(latent, generator.prior.sample(condition, replay)[:, 0])


def test_a_prior_for_another_latent_size_is_refused(tiny_text_transformer):
    import pytest

    with pytest.raises(ValueError, match="layout prior of 2 numbers for a latent of 4"):
        OneStepGenerator(
            latent_student(tiny_text_transformer, 4), GeneratorSettings(), _prior(tiny_text_transformer, latent_dim=2)
        )


class RedReward:
    """A reward of how much red an image shows: any Reward will do for the direction of tuning."""

    name = "red"

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return 10 * images[:, 0].mean((1, 2))


def test_tuning_moves_each_prompts_weight_to_the_components_the_reward_prefers(
    tmp_path, tiny_text_transformer, text_conditioner, tiny_tokenizer, one_thread
):
    from softdimo.train.prior import PriorTuning, component_rewards, tune_prior

    torch.manual_seed(0)
    generator = OneStepGenerator(
        latent_student(tiny_text_transformer, 2),
        GeneratorSettings(r_init=1.0, sigma=0.0, temperature=0.0),
        _prior(tiny_text_transformer, components=4),
    )
    with torch.no_grad():
        generator.model.latent_input.weight.mul_(50)  # each component draws an image of its own
    placed = generator.prior.means.clone()
    model_weights = {k: v.clone() for k, v in generator.model.state_dict().items()}
    condition = text_conditioner.encode_prompts(["a red circle", "two blue squares"])
    reward, settings = RedReward(), GeneratorSettings(r_init=1.0, sigma=0.0, temperature=0.0, latent_scale=0.0)

    def weights_and_rewards() -> tuple[torch.Tensor, torch.Tensor]:  # every component's image for each prompt
        at_means = OneStepGenerator(generator.model, settings, generator.prior)
        chosen = torch.arange(4).expand(2, 4)
        with torch.no_grad():
            scores = component_rewards(
                at_means,
                tiny_tokenizer,
                reward,
                condition,
                ["a red circle", "two blue squares"],
                chosen,
                ImageNoise(range(8)),
            )
            return generator.prior.mixture(condition)[0].exp(), scores

    weights, scores = weights_and_rewards()
    best = scores.argmax(-1)
    assert (
        scores.std() > 0 and weights.gather(1, best[:, None]).max() < 0.5
    )  # the images differ; the best is not yet chosen
    generator.settings = settings
    tuned = tune_prior(
        run_dir=tmp_path,
        generator=generator,
        tokenizer=tiny_tokenizer,
        conditioner=text_conditioner,
        reward=reward,
        training=PriorTuning(steps=20, prompts=4, samples=4, lr=0.03, warmup=1, kl_weight=0.0, eval_every=0),
        device=torch.device("cpu"),
    )
    tuned_weights, tuned_scores = weights_and_rewards()
    assert torch.equal(tuned_scores, scores)
    assert tuned_weights.gather(1, best[:, None]).min() > 0.9  # each prompt's weight moved to its best component
    assert torch.equal(tuned.prior.means, placed)  # components stay where they were placed
    assert all(torch.equal(v, model_weights[k]) for k, v in tuned.model.state_dict().items())  # so does the generator


def test_distinct_seeds_of_one_prompt_draw_distinct_components_and_latents(tiny_text_transformer, text_conditioner):
    prior = _prior(tiny_text_transformer, components=8)
    with torch.no_grad():
        prior.weights.weight.zero_()
        prior.weights.bias.zero_()  # every component equally likely
        condition = text_conditioner.encode_prompts(["a red circle"]).expand(64, -1)
        latents = prior.sample(condition, ImageNoise(range(64)))[:, 0]
        at_means = prior.sample(condition, ImageNoise(range(64)), scale=0.0)[:, 0]
    chosen = {tuple(row.tolist()) for row in at_means}
    assert len(chosen) == 8  # 64 seeds reach all 8 equally likely components
    assert len({tuple(row.tolist()) for row in latents}) == 64  # and every seed its own point of one
