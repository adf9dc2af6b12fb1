"""diffusers' MUSE models as teachers and students: AmusedPipeline's tokens and images reproduced exactly, and
AmusedInpaintPipeline's and AmusedImg2ImgPipeline's edits; the soft paths equal to the hard ones on one-hot input,
bundles checked file by file, and a distilled student both read, and editing."""

import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_muse import write_clip_reward, write_teacher  # noqa: E402

from softdimo import editing  # noqa: E402
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


@pytest.fixture(scope="module")
def edit_inputs(teacher):
    """Three of the teacher's images, each with a mask of its own: a box whose edges cut patches, the right half and a
    column more, a corner smaller than a patch."""
    images = teacher.generate(teacher.conditioner.encode_prompts(PROMPTS), [0, 1, 2])
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 3:11, 5:14] = True
    masks[1, :, 7:] = True
    masks[2, :3, :3] = True
    return images, masks


def diffusers_edit(pipe, image: np.ndarray, prompt: str, seed: int, **options) -> tuple[torch.Tensor, np.ndarray]:
    """One image's edit by a diffusers pipeline, alone, with its seed's generator: its tokens (N,) and uint8 pixels."""
    runs = {
        kind: pipe(
            prompt,
            image=Image.fromarray(image),
            generator=torch.Generator().manual_seed(seed),
            output_type=kind,
            **options,
        )
        for kind in ("latent", "pil")
    }
    return runs["latent"].images.flatten(), np.asarray(runs["pil"].images[0])


def test_inpainting_reproduces_amused_inpaint_pipeline_tokens_and_images(teacher, bundles, edit_inputs, one_thread):
    """Each image of a batch gets the tokens and pixels AmusedInpaintPipeline gives it alone for its mask image,
    prompt and seed: the mask read as diffusers reads it (Lanczos to the token grid, not softdimo's every patch a
    white pixel touches), drawn on its linear schedule, the whole grid decoded."""
    from diffusers import AmusedInpaintPipeline

    reference = AmusedInpaintPipeline.from_pretrained(bundles["teacher"], local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    images, masks = edit_inputs
    seeds, condition = [3, 4, 5], teacher.conditioner.encode_prompts(PROMPTS)
    repaint = teacher.repaint_from_mask(masks)
    assert repaint.sum(1).tolist() == [16, 32, 3]
    softdimo_rule = editing.repaint_from_mask(masks, grid=8)  # every token whose patch a white pixel touches
    assert softdimo_rule.sum(1).tolist() == [25, 40, 4]
    own = teacher.tokenizer.encode(torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0)
    for guidance in (teacher.sampler.guidance, 1.0):  # with and without classifier-free guidance
        pipeline = dataclasses.replace(teacher, sampler=MuseSamplerSettings(teacher.sampler.steps, guidance))
        tokens = pipeline.edit_tokens(images, repaint, condition, seeds)
        edited = pipeline.edit(images, repaint, condition, seeds)
        for i, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
            mask_image = Image.fromarray(masks[i].astype(np.uint8) * 255)
            options = {"num_inference_steps": pipeline.sampler.steps, "guidance_scale": guidance}
            theirs = diffusers_edit(reference, images[i], prompt, seed, mask_image=mask_image, **options)
            assert torch.equal(tokens[i], theirs[0]), (guidance, i)
            assert np.array_equal(edited[i], theirs[1]), (guidance, i)
        assert torch.equal(tokens[~repaint], own[~repaint]) and (tokens[repaint] != own[repaint]).any()


@pytest.mark.parametrize("strength", [0.3, 0.5, 1.0])
def test_image_to_image_reproduces_amused_img2img_pipeline_tokens_and_images(
    teacher, bundles, edit_inputs, strength, one_thread
):
    """Each image of a batch gets the tokens and pixels AmusedImg2ImgPipeline gives it alone at `strength` for its
    prompt and seed: tokens masked at random by the share of the step before the first of the last
    int(steps * strength) steps, which then run. At strength 1 that step is the last, which masks none."""
    from diffusers import AmusedImg2ImgPipeline

    reference = AmusedImg2ImgPipeline.from_pretrained(bundles["teacher"], local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    images = edit_inputs[0]
    seeds, condition = [3, 4, 5], teacher.conditioner.encode_prompts(PROMPTS)
    tokens = teacher.edit_tokens_at_strength(images, strength, condition, seeds)
    edited = teacher.edit_at_strength(images, strength, condition, seeds)
    for i, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
        options = {"strength": strength, "num_inference_steps": teacher.sampler.steps}
        theirs = diffusers_edit(reference, images[i], prompt, seed, **options)
        assert torch.equal(tokens[i], theirs[0]), i
        assert np.array_equal(edited[i], theirs[1]), i
    own = teacher.tokenizer.encode(torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0)
    repaint = teacher.repaint_at_strength(seeds, strength)  # what a server checks before it queues the edit
    if strength < 1:
        assert torch.equal(tokens[~repaint], own[~repaint]) and (tokens[repaint] != own[repaint]).any()
        assert len({row.sum().item() for row in repaint}) > 1  # a share by chance, not a count
    else:
        assert not repaint.any() and ((tokens != own).sum(1) <= 1).all()  # the one token the steps mask anyway


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
    # it edits as softdimo's one-step models do, in one pass: the tokens away from the mask kept, the rest drawn anew
    image = served.generate(condition, [1])
    mask = np.zeros((1, 16, 16), dtype=bool)
    mask[:, 5:11, 5:11] = True
    repaint = served.repaint_from_mask(mask)
    assert torch.equal(repaint, editing.repaint_from_mask(mask, grid=8)) and repaint.sum() == 16
    own = served.tokenizer.encode(torch.from_numpy(image).permute(0, 3, 1, 2) / 255.0)
    edited = served.edit_tokens(image, repaint, condition, [2])
    assert torch.equal(edited[~repaint], own[~repaint]) and (edited[repaint] != own[repaint]).any()

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
