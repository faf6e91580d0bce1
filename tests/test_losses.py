"""The divergences pinned to values computed by hand on a three-token vocabulary."""

import math

import pytest
import torch

from ctxdistill.losses import (
    answer_cross_entropy,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    teacher_distribution,
)

P = [0.7, 0.2, 0.1]  # teacher
Q = [0.5, 0.3, 0.2]  # student


def logp(probs):
    return torch.tensor(probs).log()


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def test_forward_and_reverse_kl_match_hand_computed_values():
    # KL(P||Q) = .7 ln(.7/.5) + .2 ln(.2/.3) + .1 ln(.1/.2) = 0.0851
    assert forward_kl(logp(Q), logp(P)).item() == pytest.approx(0.08512, abs=1e-4)
    assert forward_kl(logp(Q), logp(P)).item() == pytest.approx(kl(P, Q), abs=1e-6)
    assert reverse_kl(logp(Q), logp(P)).item() == pytest.approx(kl(Q, P), abs=1e-6)
    # KL(Q||P) = .5 ln(.5/.7) + .3 ln(.3/.2) + .2 ln(.2/.1) = 0.0920
    assert reverse_kl(logp(Q), logp(P)).item() == pytest.approx(0.09203, abs=1e-4)


def test_generalized_jsd_is_the_beta_mixture_and_has_trl_limits():
    m = [0.5 * p + 0.5 * q for p, q in zip(P, Q)]
    expected = 0.5 * kl(P, m) + 0.5 * kl(Q, m)
    assert generalized_jsd(logp(Q), logp(P), 0.5).item() == pytest.approx(expected, abs=1e-6)
    m = [0.9 * p + 0.1 * q for p, q in zip(P, Q)]
    assert generalized_jsd(logp(Q), logp(P), 0.9).item() == pytest.approx(0.9 * kl(P, m) + 0.1 * kl(Q, m), abs=1e-6)
    assert generalized_jsd(logp(Q), logp(P), 0.0).item() == pytest.approx(kl(P, Q), abs=1e-6)
    assert generalized_jsd(logp(Q), logp(P), 1.0).item() == pytest.approx(kl(Q, P), abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_masked_jsd_loss_and_its_gradient_equal_trls_gkd_loss(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd").GKDTrainer  # the `bench` extra, which the set-up installs
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 50, generator=generator).mul(3).requires_grad_()
    teacher = torch.randn(2, 4, 50, generator=generator).mul(3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    ours = distillation_loss(student, teacher_distribution(teacher, temperature)[0], mask, "jsd", beta, temperature)
    (ours_grad,) = torch.autograd.grad(ours, student)
    labels = torch.where(mask, 1, -100)  # TRL masks by labels, averages over the unmasked positions
    trls = gkd.generalized_jsd_loss(student, teacher, labels, beta, temperature)
    (trls_grad,) = torch.autograd.grad(trls, student)
    assert ours.item() == pytest.approx(trls.item(), rel=1e-5)
    torch.testing.assert_close(ours_grad, trls_grad, rtol=1e-4, atol=1e-7)


def test_temperature_softens_both_distributions():
    t_logp, _ = teacher_distribution(logp(P).view(1, 1, 3), temperature=2.0)
    mask = torch.ones(1, 1, dtype=torch.bool)
    p2 = torch.softmax(logp(P) / 2, -1).tolist()
    q2 = torch.softmax(logp(Q) / 2, -1).tolist()
    loss = distillation_loss(logp(Q).view(1, 1, 3), t_logp, mask, temperature=2.0)
    assert loss.item() == pytest.approx(kl(p2, q2), abs=1e-6)


def test_top_k_keeps_the_teachers_most_likely_tokens():
    values, indices = teacher_distribution(logp([0.1, 0.7, 0.2]), top_k=2)
    assert indices.tolist() == [1, 2]
    assert values.exp().tolist() == pytest.approx([0.7, 0.2])


def test_top_k_renormalised_is_forward_kl_to_the_truncated_teacher():
    t_logp, idx = teacher_distribution(logp(P).view(1, 1, 3), top_k=2)
    s_logits = logp(Q).view(1, 1, 3).requires_grad_()
    loss = distillation_loss(s_logits, t_logp, torch.ones(1, 1, dtype=torch.bool), teacher_indices=idx)
    assert loss.item() == pytest.approx(kl([0.7 / 0.9, 0.2 / 0.9, 0.0], Q), abs=1e-6)
    loss.backward()
    assert torch.isfinite(s_logits.grad).all()


def test_top_k_with_a_rest_bucket_lumps_the_other_tokens_for_teacher_and_student():
    p, q = [0.6, 0.2, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]
    t_logp, idx = teacher_distribution(logp(p).view(1, 1, 4), top_k=2)
    mask = torch.ones(1, 1, dtype=torch.bool)
    s_logits = logp(q).view(1, 1, 4)
    # Buckets: teacher [.6, .2, .2], student [.4, .3, .3]
    forward = distillation_loss(s_logits, t_logp, mask, teacher_indices=idx, top_k_rest="bucket")
    assert forward.item() == pytest.approx(kl([0.6, 0.2, 0.2], [0.4, 0.3, 0.3]), abs=1e-6)
    reverse = distillation_loss(s_logits, t_logp, mask, "reverse_kl", teacher_indices=idx, top_k_rest="bucket")
    assert reverse.item() == pytest.approx(kl([0.4, 0.3, 0.3], [0.6, 0.2, 0.2]), abs=1e-6)
    # With k = V - 1 the bucket is the last token itself: the full divergence, exactly.
    t_logp, idx = teacher_distribution(logp(P).view(1, 1, 3), top_k=2)
    full = distillation_loss(logp(Q).view(1, 1, 3), t_logp, mask, teacher_indices=idx, top_k_rest="bucket")
    assert full.item() == pytest.approx(kl(P, Q), abs=1e-6)


def test_mask_averages_over_answer_positions_only():
    teacher = torch.stack([logp(P), logp(Q)]).view(1, 2, 3)
    student = torch.stack([logp(Q), torch.tensor([0.0, -50.0, 9.0])]).view(1, 2, 3)
    loss = distillation_loss(student, teacher, torch.tensor([[True, False]]))
    assert loss.item() == pytest.approx(kl(P, Q), abs=1e-6)


def test_gradient_flows_through_the_student_only():
    teacher = torch.randn(2, 1, 5, requires_grad=True)
    student = torch.randn(2, 1, 5, requires_grad=True)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        student.grad = None
        t_logp, _ = teacher_distribution(teacher)
        distillation_loss(student, t_logp, torch.ones(2, 1, dtype=torch.bool), divergence).backward()
        assert teacher.grad is None
        assert student.grad.abs().sum() > 0


def test_identical_distributions_have_zero_divergence():
    logits = torch.randn(3, 2, 7)
    mask = torch.ones(3, 2, dtype=torch.bool)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        t_logp, _ = teacher_distribution(logits)
        assert distillation_loss(logits, t_logp, mask, divergence).item() == pytest.approx(0.0, abs=1e-6)


def test_answer_cross_entropy_is_mean_negative_log_likelihood_of_masked_targets():
    logits = logp(Q).view(1, 1, 3).expand(1, 2, 3)
    loss = answer_cross_entropy(logits, torch.tensor([[0, 2]]), torch.tensor([[False, True]]))
    assert loss.item() == pytest.approx(-math.log(0.2), abs=1e-6)
