"""Di[M]O's objective: the surrogate's gradient is the closed-form divergence gradient."""

from dataclasses import asdict

import torch

from softdimo.train.distill import jeffreys_logit_gradient, relaxed_tokens, surrogate_loss


def test_forward_kl_gradient_is_p_aux_minus_p_teacher():
    g = torch.Generator().manual_seed(0)
    aux, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    grad = jeffreys_logit_gradient(aux, teacher, beta=0.0)
    assert torch.allclose(grad, aux.softmax(-1) - teacher.softmax(-1))
    # the same thing by autograd: d/d(aux logits) of cross-entropy(p_teacher, softmax(aux)) = KL + const
    a = aux.clone().requires_grad_(True)
    (-(teacher.softmax(-1) * a.log_softmax(-1)).sum()).backward()
    assert torch.allclose(grad, a.grad, atol=1e-6)


def test_reverse_kl_gradient_matches_autograd():
    g = torch.Generator().manual_seed(1)
    aux, teacher = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    a = aux.clone().requires_grad_(True)
    kl = (a.softmax(-1) * (a.log_softmax(-1) - teacher.log_softmax(-1))).sum()
    kl.backward()
    assert torch.allclose(jeffreys_logit_gradient(aux, teacher, beta=1.0), a.grad, atol=1e-6)
    mixed = jeffreys_logit_gradient(aux, teacher, beta=0.3)
    expected = 0.7 * jeffreys_logit_gradient(aux, teacher, 0.0) + 0.3 * a.grad
    assert torch.allclose(mixed, expected, atol=1e-6)


def test_surrogate_gradient_equals_the_closed_form_at_masked_positions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    grad = torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]])
    surrogate_loss(logits, grad, mask).backward()
    assert torch.allclose(logits.grad, grad * mask[..., None] / 2)


def test_relaxations_are_distributions_with_gradients():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    gumbel = torch.zeros(2, 3, 5)
    soft = relaxed_tokens(logits, "soft", gumbel)
    assert torch.allclose(soft.sum(-1), torch.ones(2, 3))
    straight = relaxed_tokens(logits, "straight-through", gumbel)
    assert torch.allclose(straight.detach(), torch.nn.functional.one_hot(logits.argmax(-1), 5).float())
    (straight * torch.arange(5.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_distillation_runs_resumes_and_exports_a_loadable_one_step_bundle(tmp_path):
    import numpy as np
    from tiny_bundles import write_all

    from softdimo.bundle import read_bundle
    from softdimo.generator import GeneratorSettings
    from softdimo.pipeline import OneStepPipeline, load_pipeline, load_reward
    from softdimo.pipeline import save_one_step
    from softdimo.train.distill import DistillParts, DistillTraining, train_distill
    from softdimo.tteo import TTEOSettings

    bundles = write_all(tmp_path / "b")
    teacher = load_pipeline(bundles["text"])
    reward = load_reward(read_bundle(bundles["reward"]))
    parts = DistillParts(
        teacher=teacher.model, tokenizer=teacher.tokenizer, conditioner=teacher.conditioner, reward=reward
    )
    training = DistillTraining(
        steps=2, batch_size=4, gan_weight=0.5, reward_weight=0.5, eval_every=2, eval_prompts=5, warmup=1
    )
    run_dir = tmp_path / "run"
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    generator = train_distill(
        run_dir=run_dir, parts=parts, generator_settings=GeneratorSettings(), training=training, device="cpu"
    )
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in before.items()), "the teacher must stay frozen"
    changed = [k for k, v in generator.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and "token_embedding.weight" not in changed and "position" not in changed
    assert (run_dir / "checkpoint.safetensors").exists()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "gan_d" in lines[0] and "reward" in lines[0] and "pass" in lines[-1]

    # rerunning with more steps resumes from the checkpoint instead of starting over
    longer = DistillTraining(**{**training.__dict__, "steps": 3, "relaxation": "straight-through"})
    train_distill(run_dir=run_dir, parts=parts, generator_settings=GeneratorSettings(), training=longer, device="cpu")
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3

    out = tmp_path / "b" / "one-step-trained"
    save_one_step(
        generator,
        out,
        name="trained",
        conditioner=teacher.conditioner,
        tokenizer_reference="../tokenizer",
        reward_references=["../reward"],
        tteo=TTEOSettings(),
        teacher_reference="../teacher-text",
        training=asdict(training),
    )
    pipeline = load_pipeline(out)
    assert isinstance(pipeline, OneStepPipeline) and list(pipeline.rewards) == ["tiny-clip"]
    images = pipeline.generate(teacher.conditioner.encode_prompts(["a red circle"]), [0])
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8


def test_distillation_continues_from_a_one_step_model_and_leaves_it_untouched(tmp_path):
    from tiny_bundles import write_all

    from softdimo.generator import GeneratorSettings
    from softdimo.pipeline import load_pipeline
    from softdimo.train.distill import DistillParts, DistillTraining, train_distill

    bundles = write_all(tmp_path / "b")
    teacher = load_pipeline(bundles["text"])
    start = load_pipeline(bundles["one-step"]).generator.model
    start_weights = {k: v.clone() for k, v in start.state_dict().items()}
    parts = DistillParts(
        teacher=teacher.model, tokenizer=teacher.tokenizer, conditioner=teacher.conditioner, reward=None, initial=start
    )
    training = DistillTraining(steps=1, batch_size=2, eval_every=1, eval_prompts=2, warmup=1, ema=0.0)
    generator = train_distill(
        run_dir=tmp_path / "run", parts=parts, generator_settings=GeneratorSettings(), training=training, device="cpu"
    )
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in start_weights.items()), (
        "the starting model is copied, not trained"
    )
    trained = generator.model.state_dict()
    # embeddings stay the starting model's; the blocks moved away from it (ema 0: the EMA is the student)
    assert torch.equal(trained["token_embedding.weight"], start_weights["token_embedding.weight"])
    assert any(not torch.equal(trained[k], start_weights[k]) for k in trained if k.startswith("blocks"))


def test_without_dimo_only_the_gan_and_reward_terms_train_the_generator(tmp_path):
    from tiny_bundles import write_all

    from softdimo.bundle import read_bundle
    from softdimo.generator import GeneratorSettings
    from softdimo.pipeline import load_pipeline, load_reward
    from softdimo.train.distill import DistillParts, DistillTraining, train_distill

    bundles = write_all(tmp_path / "b")
    teacher = load_pipeline(bundles["text"])
    reward = load_reward(read_bundle(bundles["reward"]))
    parts = DistillParts(
        teacher=teacher.model, tokenizer=teacher.tokenizer, conditioner=teacher.conditioner, reward=reward
    )
    training = DistillTraining(
        steps=1, batch_size=2, dimo_weight=0.0, reward_weight=1.0, eval_every=1, eval_prompts=2, warmup=1, ema=0.0
    )
    generator = train_distill(
        run_dir=tmp_path / "run", parts=parts, generator_settings=GeneratorSettings(), training=training, device="cpu"
    )
    (line,) = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert (
        '"reward"' in line and '"dimo"' not in line and '"aux"' not in line
    )  # no divergence, no auxiliary model trained
    moved = [k for k, v in generator.model.state_dict().items() if not torch.equal(v, teacher.model.state_dict()[k])]
    assert any(k.startswith("blocks") for k in moved)  # the reward alone moved the generator
