"""Di[M]O's objective: the surrogate's gradient is the closed-form divergence gradient."""

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
