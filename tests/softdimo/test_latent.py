"""The layout latent: a one-step generator's global Gaussian input, and the stage that fits it."""

import torch

from softdimo.generator import GeneratorSettings, OneStepGenerator
from softdimo.seeding import ImageNoise
from softdimo.layout_prior import small_body
from softdimo.train.latent import LayoutEncoder, latent_student


def _latent_generator(teacher, latent_dim=4, **settings) -> OneStepGenerator:
    torch.manual_seed(0)
    return OneStepGenerator(latent_student(teacher, latent_dim), GeneratorSettings(**settings))


def test_a_latent_student_is_the_teacher_plus_a_latent_input(tiny_text_transformer):
    student = latent_student(tiny_text_transformer, 4)
    teacher_weights = tiny_text_transformer.state_dict()
    own = {k for k in student.state_dict() if k not in teacher_weights}
    assert own == {"latent_input.weight", "latent_input.bias"}
    assert all(torch.equal(student.state_dict()[k], v) for k, v in teacher_weights.items())


def test_the_latent_is_drawn_per_image_after_the_token_noise_and_can_be_given(tiny_text_transformer, text_conditioner):
    gen = _latent_generator(tiny_text_transformer, r_init=1.0, sigma=0.0)
    noise = ImageNoise([3, 4])
    condition = text_conditioner.encode_prompts(["a red circle", "two blue squares"])
    embeddings = gen.initial_embeddings(noise, condition)
    # the same stream by hand: hybrid tokens, embedding noise, then the latent
    replay = ImageNoise([3, 4])
    tokens = gen.initial_tokens(replay)
    replay.randn(gen.cfg.tokens, gen.cfg.width)
    latent = replay.randn(4)
    expected = gen.model.embed(tokens) + gen.model.latent_embeddings(latent)
    assert torch.allclose(embeddings, expected)
    given = torch.zeros(2, 4)
    given_input = gen.initial_embeddings(ImageNoise([3, 4]), condition, latent=given)
    assert torch.allclose(given_input, gen.model.embed(tokens) + gen.model.latent_input.bias.view(1, 64, -1))
    # an image never depends on its batch-mates, and different latents make different inputs
    together = gen.generate_tokens(condition, ImageNoise([3, 4]))
    assert torch.equal(gen.generate_tokens(condition[1:], ImageNoise([4]))[0], together[1])
    assert not torch.allclose(embeddings[0], embeddings[1])


def test_the_encoder_reads_positions(tiny_text_transformer, text_conditioner):
    torch.manual_seed(0)
    encoder = LayoutEncoder(small_body(tiny_text_transformer.cfg, width=16, depth=1, heads=2), 4)
    tokens = torch.zeros(2, 64, dtype=torch.long)
    tokens[0, 5], tokens[1, 40] = 7, 7  # the same content at two places
    mean, log_var = encoder(tokens, text_conditioner.encode_prompts(["a red circle", "a red circle"]))
    assert mean.shape == log_var.shape == (2, 4)
    assert not torch.allclose(mean[0], mean[1])


def _recipe(root, name: str, stage: str, inputs: dict, tables: str):
    """A stage's recipe under `root`: writes bundle `root/name`, runs in `root/runs/name`."""
    path = root / f"{name}.toml"
    lines = "".join(f'{key} = "{value}"\n' for key, value in inputs.items())
    path.write_text(
        f'stage = "{stage}"\nout = "{root / name}"\nrun_dir = "{root / "runs" / name}"\n[inputs]\n{lines}{tables}'
    )
    return path


def test_the_latent_prior_tuning_and_distillation_stages_train_in_a_chain(tmp_path, one_thread):
    from tiny_bundles import write_all

    from softdimo.bundle import read_bundle
    from softdimo.pipeline import OneStepPipeline, load_pipeline
    from softdimo.train.recipe import run_all

    bundles = write_all(tmp_path / "b")
    latent_recipe = _recipe(
        tmp_path,
        "latent",
        "latent",
        {"teacher": bundles["text"], "reward": bundles["reward"]},
        "[transformer]\nlatent_dim = 4\n[generator]\nr_init = 1.0\nsigma = 0.0\ntemperature = 0.0\n"
        "[training]\nsteps = 2\nbatch_size = 4\nwarmup = 1\neval_every = 2\neval_prompts = 3\nencoder_width = 16\nencoder_depth = 1\nencoder_heads = 2\n",
    )
    run_all([latent_recipe], torch.device("cpu"))
    metrics = (tmp_path / "runs" / "latent" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2 and '"kl"' in metrics[0] and '"pass"' in metrics[-1]
    pipeline = load_pipeline(tmp_path / "latent")
    assert (
        isinstance(pipeline, OneStepPipeline)
        and pipeline.generator.cfg.latent_dim == 4
        and list(pipeline.rewards) == ["tiny-clip"]
    )
    teacher = load_pipeline(bundles["text"])
    assert not torch.equal(
        pipeline.generator.model.latent_input.weight, torch.zeros_like(pipeline.generator.model.latent_input.weight)
    )
    table = teacher.model.token_embedding.weight
    assert torch.equal(
        pipeline.generator.model.token_embedding.weight, table.half().float()
    )  # the teacher's, stored in fp16

    run_all(
        [latent_recipe], torch.device("cpu"), overrides=["training.steps=3"]
    )  # more steps go on from the checkpoint
    assert len((tmp_path / "runs" / "latent" / "metrics.jsonl").read_text().splitlines()) == 3
    assert pipeline.generator.prior is None  # drawn from the standard normal until a prior is fitted

    prior_recipe = _recipe(
        tmp_path,
        "prior",
        "prior",
        {"teacher": bundles["text"], "init": tmp_path / "latent"},
        "[prior]\ncomponents = 3\nwidth = 16\ndepth = 1\nheads = 2\n[training]\nsteps = 2\nbatch_size = 4\nwarmup = 1\neval_every = 2\neval_prompts = 3\n",
    )
    run_all([prior_recipe], torch.device("cpu"))
    with_prior = load_pipeline(tmp_path / "prior")
    assert with_prior.generator.prior.cfg.components == 3 and with_prior.generator.prior.means.abs().sum() > 0  # placed
    assert (
        "encoder" in read_bundle(tmp_path / "latent").config and "encoder" not in read_bundle(tmp_path / "prior").config
    )
    latent_weights = load_pipeline(tmp_path / "latent").generator.model.state_dict()
    assert all(
        torch.equal(v, latent_weights[k]) for k, v in with_prior.generator.model.state_dict().items()
    )  # the generator as it was

    tuning_recipe = _recipe(
        tmp_path,
        "tuned",
        "prior-reward",
        {"teacher": bundles["text"], "init": tmp_path / "prior", "reward": bundles["reward"]},
        "[training]\nsteps = 2\nprompts = 2\nsamples = 2\nwarmup = 1\neval_every = 2\neval_prompts = 3\n",
    )
    run_all([tuning_recipe], torch.device("cpu"))
    metrics = (tmp_path / "runs" / "tuned" / "metrics.jsonl").read_text().splitlines()
    assert (
        len(metrics) == 2 and '"reward"' in metrics[0] and '"kl"' in metrics[0] and '"components_in_use"' in metrics[0]
    )
    assert (
        '"pass"' in metrics[-1] and '"coverage"' in metrics[-1]
    )  # the one-step stages log coverage beside the pass rate
    tuned = load_pipeline(tmp_path / "tuned")
    assert torch.equal(tuned.generator.prior.means, with_prior.generator.prior.means)  # the same components
    assert not torch.equal(
        tuned.generator.prior.weights.weight, with_prior.generator.prior.weights.weight
    )  # reweighted
    assert all(
        torch.equal(v, latent_weights[k]) for k, v in tuned.generator.model.state_dict().items()
    )  # the generator as it was

    distill_recipe = _recipe(
        tmp_path,
        "distilled",
        "distill",
        {"teacher": bundles["text"], "init": tmp_path / "tuned"},
        "[generator]\nr_init = 1.0\nsigma = 0.0\n[training]\nsteps = 1\nbatch_size = 2\nwarmup = 1\neval_every = 1\neval_prompts = 2\n",
    )
    run_all([distill_recipe], torch.device("cpu"))
    distilled = load_pipeline(tmp_path / "distilled")
    assert distilled.generator.cfg.latent_dim == 4
    prior_weights = tuned.generator.prior.state_dict()
    assert all(
        torch.equal(v, prior_weights[k]) for k, v in distilled.generator.prior.state_dict().items()
    )  # carried, unchanged
    images = distilled.generate(distilled.conditioner.encode_prompts(["a red circle"]), [0])
    assert images.shape == (1, 64, 64, 3)
