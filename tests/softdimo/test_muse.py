"""diffusers' MUSE models as teachers and students: AmusedPipeline's tokens and images reproduced exactly, the soft
paths equal to the hard ones on one-hot input, bundles checked file by file, and a distilled student both read."""

import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_muse import write_clip_reward, write_teacher  # noqa: E402

from softdimo.bundle import BundleError, read_bundle  # noqa: E402
from softdimo.conditioning import ConditionError  # noqa: E402
from softdimo.muse import MuseSamplerSettings, sample  # noqa: E402
from softdimo.pipeline import load_pipeline  # noqa: E402
from softdimo.seeding import ImageNoise  # noqa: E402

PROMPTS = ["a red circle", "two blue squares left of a green triangle", "three yellow circles"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("muse")
    return {"teacher": write_teacher(root / "teacher"), "clip": write_clip_reward(root / "clip")}


@pytest.fixture(scope="module")
def teacher(bundles):
    return load_pipeline(bundles["teacher"])


@pytest.fixture(scope="module")
def reference(bundles):
    """diffusers' own pipeline on the same folder."""
    from diffusers import AmusedPipeline

    pipe = AmusedPipeline.from_pretrained(bundles["teacher"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sampler_reproduces_amused_pipeline_tokens_and_images(teacher, reference, one_thread):
    """Exact parity, not the fallback: AmusedScheduler's randomness is one torch.Generator, and our sampler draws
    each image's tokens from a generator of its own in the same order, so image i of a batch gets the tokens and
    pixels AmusedPipeline gives its prompt alone with generator=torch.Generator().manual_seed(seed_i)."""
    seeds = [3, 4, 5]
    condition = teacher.conditioner.encode_prompts(PROMPTS)
    for guidance in (teacher.sampler.guidance, 1.0):  # with and without classifier-free guidance
        settings = MuseSamplerSettings(steps=teacher.sampler.steps, guidance=guidance)
        ours = sample(teacher.model, condition, ImageNoise(seeds), settings)
        for i, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
            theirs = reference(
                prompt,
                num_inference_steps=settings.steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            ).images
            assert torch.equal(ours[i], theirs.flatten()), (guidance, prompt)
    assert len({tuple(row.tolist()) for row in ours}) == 3  # the images differ
    images = teacher.generate(condition, seeds)
    pixels = reference(
        PROMPTS[1],
        num_inference_steps=teacher.sampler.steps,
        generator=torch.Generator().manual_seed(4),
        output_type="pil",
    )
    assert np.array_equal(images[1], np.asarray(pixels.images[0]))
    assert images.shape == (3, 16, 16, 3) and images.std() > 0


def test_adapter_logits_are_the_uvit_s_and_soft_paths_equal_hard_ones_on_one_hot_input(teacher, one_thread):
    model, tokenizer, cfg = teacher.model, teacher.tokenizer, teacher.model.cfg
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.mask_id + 1, (2, cfg.tokens), generator=g)
    condition = teacher.conditioner.encode_prompts(PROMPTS[:2])
    text = model.encode_text(condition)
    micro = torch.tensor([cfg.image_size, cfg.image_size, 0, 0, 6.0])[None].expand(2, -1)
    theirs = model.uvit(tokens.view(2, cfg.grid, cfg.grid), text.hidden, text.pooled, micro)  # (B, K, h, w)
    assert torch.equal(model(tokens, condition), theirs.flatten(2).transpose(1, 2))

    one_hot = torch.nn.functional.one_hot(tokens.clamp_max(cfg.codebook_size - 1), cfg.codebook_size).float()
    assert torch.allclose(model.soft_embed(one_hot), model.embed(tokens.clamp_max(cfg.codebook_size - 1)), atol=1e-5)
    assert torch.allclose(model.mask_embedding(), model.embed(torch.full((1, cfg.tokens), cfg.mask_id))[0, 5])
    assert torch.allclose(
        tokenizer.decode_soft(one_hot), tokenizer.decode_indices(tokens.clamp_max(cfg.codebook_size - 1)), atol=1e-5
    )
    states = model.hidden_states(model.embed(tokens), condition, layers=(0, 1))
    assert [s.shape for s in states] == [
        (2, cfg.tokens // 4, cfg.state_width)
    ] * 2  # the UVit works on a downsampled grid

    probs = torch.randn(2, cfg.tokens, cfg.codebook_size, generator=g).softmax(-1).requires_grad_(True)
    tokenizer.decode_soft(probs).mean().backward()
    assert probs.grad.abs().sum() > 0
    real = tokenizer.decode_indices(tokens.clamp_max(cfg.codebook_size - 1))
    assert tokenizer.encode(real).shape == (2, cfg.tokens)


def test_prompts_are_free_text_that_fits_the_clip_length(teacher):
    ids = teacher.conditioner.encode_prompts(["A photo of a cat, at dusk"])
    assert ids.shape == (1, teacher.model.cfg.text_length)
    with pytest.raises(ConditionError, match="CLIP tokens long"):
        teacher.conditioner.encode_prompts(["a prompt that goes on " + "and on " * 20])
    with pytest.raises(ConditionError, match="text-conditional"):
        teacher.conditioner.encode_labels([0])


def test_a_bundle_verifies_files_in_its_subfolders_and_says_what_is_missing(bundles, tmp_path):
    from softdimo.muse import write_teacher_bundle

    copy = shutil.copytree(bundles["teacher"], tmp_path / "copy")
    weights = copy / "vqvae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="checksum mismatch for vqvae/diffusion_pytorch_model.safetensors"):
        read_bundle(copy)
    shutil.rmtree(copy / "scheduler")
    with pytest.raises(BundleError, match="no scheduler/ folder"):
        write_teacher_bundle(copy, name="broken")
    # the import command copies a diffusers folder into a bundle
    from softdimo.cli import main

    assert (
        main(
            [
                "import",
                "muse",
                str(bundles["teacher"]),
                str(tmp_path / "imported"),
                "--name",
                "imported",
                "--steps",
                "3",
            ]
        )
        == 0
    )
    # a flag left out (--guidance) takes MuseSamplerSettings' default
    imported = MuseSamplerSettings.from_dict(read_bundle(tmp_path / "imported").config["sampler"])
    assert imported == MuseSamplerSettings(steps=3)


def test_a_distilled_student_is_read_by_softdimo_and_by_diffusers(bundles, teacher, tmp_path, one_thread):
    from diffusers import AmusedPipeline, UVit2DModel

    from softdimo import muse
    from softdimo.generator import GeneratorSettings, OneStepGenerator
    from softdimo.pipeline import OneStepPipeline, load_reward
    from softdimo.train.distill import DistillParts, DistillTraining, train_distill

    reward = load_reward(read_bundle(bundles["clip"]))
    parts = DistillParts(
        teacher=teacher.model, tokenizer=teacher.tokenizer, conditioner=teacher.conditioner, reward=reward
    )
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    training = DistillTraining(
        steps=2, batch_size=4, warmup=1, guidance=1.0, gan_weight=0.5, reward_weight=0.5, ema=0.0, eval_every=1
    )
    student = train_distill(
        run_dir=tmp_path / "run", parts=parts, generator_settings=GeneratorSettings(), training=training, device="cpu"
    )
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in before.items()), "the teacher stays frozen"
    after = student.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("uvit.embed.", "text_encoder.")))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("uvit.transformer_layers."))
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 2 and all(key in log[0] for key in ('"dimo"', '"gan_d"', '"reward"')) and '"pass"' not in log[-1]

    out = muse.export_generator(
        generator=student,
        teacher=read_bundle(bundles["teacher"]),
        path=tmp_path / "student",
        name="tiny-student",
        reward_references=[os.path.relpath(bundles["clip"], tmp_path / "student")],
        tteo={"steps": 2, "lr": 1.0},
        training={},
        teacher_reference=os.path.relpath(bundles["teacher"], tmp_path / "student"),
    )
    served = load_pipeline(out)
    assert isinstance(served, OneStepPipeline) and list(served.rewards) == ["tiny-clip-vit"]
    condition = served.conditioner.encode_prompts(["a red circle"])
    assert served.generate(condition, [0]).shape == (1, 16, 16, 3)

    # diffusers reads the same folder: its UVit2DModel is the student, and gives the student's logits on its input
    uvit = UVit2DModel.from_pretrained(out / "transformer", local_files_only=True)
    assert all(torch.equal(v, student.model.uvit.state_dict()[k]) for k, v in uvit.state_dict().items())
    AmusedPipeline.from_pretrained(out, local_files_only=True)
    noiseless = OneStepGenerator(served.generator.model, GeneratorSettings(sigma=0.0))  # the input is embedded tokens
    hybrid = noiseless.initial_tokens(ImageNoise([7]))  # random and mask tokens, as diffusers' model takes them
    text = served.generator.model.encode_text(condition)
    micro = torch.tensor([16.0, 16.0, 0, 0, 6.0])[None]
    theirs = uvit(hybrid.view(1, 8, 8), text.hidden, text.pooled, micro).flatten(2).transpose(1, 2)
    assert torch.allclose(
        noiseless.logits(noiseless.initial_embeddings(ImageNoise([7]), condition), condition), theirs, atol=1e-5
    )


def test_own_prompts_distil_without_a_gan(teacher, tmp_path):
    from softdimo.generator import GeneratorSettings
    from softdimo.train.distill import DistillParts, DistillTraining, train_distill

    parts = DistillParts(
        teacher=teacher.model,
        tokenizer=teacher.tokenizer,
        conditioner=teacher.conditioner,
        reward=None,
        prompts=["a photo of a cat", "a watercolour of a harbour"],
    )
    with pytest.raises(ValueError, match="GAN needs real images"):
        train_distill(
            run_dir=tmp_path / "gan",
            parts=parts,
            generator_settings=GeneratorSettings(),
            training=DistillTraining(steps=1, gan_weight=1.0),
            device="cpu",
        )
    training = DistillTraining(steps=1, batch_size=2, warmup=1, guidance=1.0, eval_every=1)
    train_distill(
        run_dir=tmp_path / "run", parts=parts, generator_settings=GeneratorSettings(), training=training, device="cpu"
    )
    assert '"dimo"' in (tmp_path / "run" / "metrics.jsonl").read_text()
