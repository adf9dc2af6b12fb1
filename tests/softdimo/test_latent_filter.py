"""The latent filter: a one-step generator draws the first of its prior's proposals that the filter accepts."""

from dataclasses import replace

import pytest
import torch

from softdimo.generator import GeneratorSettings, OneStepGenerator
from softdimo.latent_filter import LatentFilter, LatentFilterConfig
from softdimo.layout_prior import LayoutPrior, LayoutPriorConfig, small_body
from softdimo.seeding import ImageNoise
from softdimo.train.latent import latent_student

LATENT = 2
PROMPTS = ["a red circle", "three cyan triangles", "a blue square left of a red circle"]


def _prior(transformer, components=8) -> LayoutPrior:
    torch.manual_seed(0)
    body = small_body(transformer.cfg, width=16, depth=1, heads=2, tokens=1)
    prior = LayoutPrior(LayoutPriorConfig(body=body, latent_dim=LATENT, components=components)).eval()
    prior.place(3 * torch.randn(components, LATENT), torch.full((components, LATENT), -1.0))
    return prior


def _filter(transformer) -> LatentFilter:
    torch.manual_seed(1)
    body = replace(small_body(transformer.cfg, width=16, depth=1, heads=2, tokens=2), latent_dim=LATENT)
    return LatentFilter(LatentFilterConfig(body=body, reward="red", bar=0.5)).eval()


def _generator(transformer, proposals: int, with_filter: bool = True) -> OneStepGenerator:
    settings = GeneratorSettings(r_init=1.0, sigma=0.0, temperature=0.0, proposals=proposals, prior_temperature=2.0)
    student = latent_student(transformer, LATENT)
    with torch.no_grad():
        student.latent_input.weight.mul_(50)  # a latent decides the image
    return OneStepGenerator(student, settings, _prior(transformer), _filter(transformer) if with_filter else None)


class FixedOdds(LatentFilter):
    """A filter whose log-odds are given, to check the choice alone."""

    def __init__(self, odds: torch.Tensor):
        torch.nn.Module.__init__(self)
        self.odds = odds

    def log_odds(self, latents, condition):
        return self.odds


def test_the_first_accepted_proposal_is_drawn_else_the_likeliest():
    latents = torch.arange(12.0).view(3, 4, 1)  # three images, four proposals each
    odds = torch.tensor([[-1.0, 2.0, 3.0, -4.0], [-3.0, -1.0, -2.0, -5.0], [0.0, 5.0, 1.0, 1.0]])
    chosen = FixedOdds(odds).choose(latents, torch.zeros(3, 1))
    # the second proposal is the first accepted, though the third is likelier; none accepted: the likeliest;
    # log-odds 0 is accepted
    assert chosen.flatten().tolist() == [1.0, 5.0, 8.0]


def test_a_generator_draws_the_first_of_its_priors_proposals_its_filter_accepts(
    tiny_text_transformer, text_conditioner
):
    generator = _generator(tiny_text_transformer, proposals=4)
    condition = text_conditioner.encode_prompts(PROMPTS)
    seeds = [3, 4, 5]
    with torch.no_grad():
        replay = ImageNoise(seeds)  # the hybrid tokens and embedding noise come first, then the proposals
        generator.initial_tokens(replay)
        replay.randn(generator.cfg.tokens, generator.cfg.width)
        proposals = generator.prior.sample(condition, replay, temperature=2.0, count=4)
        head = generator.latent_filter.head
        head.weight.mul_(100)
        head.bias.sub_(generator.latent_filter.log_odds(proposals, condition).median())  # it accepts about half
        odds = generator.latent_filter.log_odds(proposals, condition)
        _, latent = generator.input_parts(ImageNoise(seeds), condition)
    assert (odds >= 0).any() and not (odds >= 0).all()  # the filter takes some proposals and refuses others
    for i in range(len(seeds)):
        accepted = (odds[i] >= 0).nonzero().flatten().tolist()
        pick = accepted[0] if accepted else odds[i].argmax().item()
        assert torch.equal(latent[i], proposals[i, pick])
    # one proposal: the filter is not consulted, the image is the unfiltered generator's
    one, plain = _generator(tiny_text_transformer, 1), _generator(tiny_text_transformer, 1, with_filter=False)
    assert torch.equal(
        one.generate_tokens(condition, ImageNoise(seeds)), plain.generate_tokens(condition, ImageNoise(seeds))
    )


def test_a_filter_for_another_latent_size_or_without_a_prior_is_refused(tiny_text_transformer):
    generator = _generator(tiny_text_transformer, proposals=4)
    with pytest.raises(ValueError, match="latent filter of 2 numbers for a latent of 3"):
        OneStepGenerator(latent_student(tiny_text_transformer, 3), generator.settings, None, generator.latent_filter)
    with pytest.raises(ValueError, match="no prior"):
        OneStepGenerator(generator.model, generator.settings, None, generator.latent_filter)
    with pytest.raises(ValueError, match="proposals must be at least 1"):
        GeneratorSettings(proposals=0)


class RedReward:
    """How much red an image shows: any reward does for learning which latents clear a bar."""

    name = "red"

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return 10 * images[:, 0].mean((1, 2))


def test_training_teaches_the_filter_which_latents_clear_the_bar_and_keeps_the_rest(
    tmp_path, tiny_text_transformer, text_conditioner, tiny_tokenizer, one_thread
):
    from softdimo.train.latent_filter import (
        EXAMPLES,
        FilterNetwork,
        FilterTraining,
        filter_metrics,
        train_latent_filter,
    )

    generator = _generator(tiny_text_transformer, proposals=4, with_filter=False)
    model_weights = {k: v.clone() for k, v in generator.model.state_dict().items()}
    prior_weights = {k: v.clone() for k, v in generator.prior.state_dict().items()}
    training = FilterTraining(prompts=40, latents=8, steps=300, batch_size=64, lr=3e-3, warmup=10, eval_every=0)
    probe = train_latent_filter(
        run_dir=tmp_path / "probe",
        generator=generator,
        tokenizer=tiny_tokenizer,
        conditioner=text_conditioner,
        reward=RedReward(),
        network=FilterNetwork(width=16, depth=1, heads=2, slots=2),
        training=replace(training, steps=0),
        device=torch.device("cpu"),
    )
    examples = torch.load(tmp_path / "probe" / EXAMPLES)
    bar = examples["rewards"].median().item()  # half the latents clear it
    training = replace(training, bar=bar)
    trained = train_latent_filter(
        run_dir=tmp_path / "trained",
        generator=generator,
        tokenizer=tiny_tokenizer,
        conditioner=text_conditioner,
        reward=RedReward(),
        network=FilterNetwork(width=16, depth=1, heads=2, slots=2),
        training=training,
        device=torch.device("cpu"),
    )
    held_out = {k: v[-training.latents * 4 :] for k, v in torch.load(tmp_path / "trained" / EXAMPLES).items()}
    assert 0.25 < held_out["cleared"].mean() < 0.75  # a guess of one answer is far from right
    assert filter_metrics(probe.latent_filter, held_out, "cpu")["filter_accuracy"] < 0.75  # untrained
    assert filter_metrics(trained.latent_filter, held_out, "cpu")["filter_accuracy"] >= 0.85
    assert trained.latent_filter.cfg.bar == bar and trained.settings.proposals == 4
    assert all(torch.equal(v, model_weights[k]) for k, v in trained.model.state_dict().items())
    assert all(torch.equal(v, prior_weights[k]) for k, v in trained.prior.state_dict().items())


def test_a_bundle_keeps_its_filter(tmp_path, tiny_text_transformer, text_conditioner):
    import os

    from tiny_bundles import write_tokenizer

    from softdimo.pipeline import load_pipeline, save_one_step
    from softdimo.tteo import TTEOSettings

    generator = _generator(tiny_text_transformer, proposals=4)
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    folder = tmp_path / "one-step"
    save_one_step(
        generator,
        folder,
        name="tiny-filtered",
        conditioner=text_conditioner,
        tokenizer_reference=os.path.relpath(tokenizer, folder),
        reward_references=[],
        tteo=TTEOSettings(),
        dtype=None,
    )
    loaded = load_pipeline(folder).generator
    assert loaded.latent_filter.cfg == generator.latent_filter.cfg and loaded.settings.proposals == 4
    condition = text_conditioner.encode_prompts(PROMPTS)
    assert torch.equal(
        loaded.generate_tokens(condition, ImageNoise([7, 8, 9])),
        generator.generate_tokens(condition, ImageNoise([7, 8, 9])),
    )
