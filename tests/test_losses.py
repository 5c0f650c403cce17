"""Each loss against an independent computation of its formula."""

import math

import numpy as np
import pytest
import torch

from edgekd.distill.losses import kd_loss, kd_objective, temperature_at


def _softmax(z, t):
    e = np.exp((z - z.max(axis=1, keepdims=True)) / t)
    return e / e.sum(axis=1, keepdims=True)


def _kd_reference(s, t, temp):
    """T^2 * mean over the batch of sum_k p_t log(p_t / p_s), written out in numpy."""
    p_t, p_s = _softmax(t, temp), _softmax(s, temp)
    return temp**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 10.0])
def test_kd_loss_matches_formula(temp):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(16, 10)) * 3, rng.normal(size=(16, 10)) * 3
    got = kd_loss(torch.tensor(s), torch.tensor(t), temp).item()
    assert got == pytest.approx(_kd_reference(s, t, temp), rel=1e-9, abs=1e-12)


def test_kd_loss_argument_order_is_kl_teacher_student():
    """KL is asymmetric: swapping student and teacher must change the value (the student goes first)."""
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(8, 5)) * 2, rng.normal(size=(8, 5)) * 4
    forward = kd_loss(torch.tensor(s), torch.tensor(t), 2.0).item()
    assert forward == pytest.approx(_kd_reference(s, t, 2.0), rel=1e-9)
    assert forward != pytest.approx(_kd_reference(t, s, 2.0), rel=1e-3)


def test_kd_loss_t_squared_scaling():
    """With the T^2 factor, the soft-target gradient keeps its magnitude as T grows (Hinton et al. sec. 2.1):
    for large T the gradient w.r.t. the student logits tends to (z_s - z_t)/N_classes/batch, independent of T."""
    rng = np.random.default_rng(2)
    s = torch.tensor(rng.normal(size=(4, 10)) * 0.5, requires_grad=True)
    t = torch.tensor(rng.normal(size=(4, 10)) * 0.5)
    grads = []
    for temp in (20.0, 40.0):
        s.grad = None
        kd_loss(s, t, temp).backward()
        grads.append(s.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=0.1, atol=1e-4)
    # and the unscaled KL gradient would have shrunk by (40/20)^2 = 4
    assert kd_loss(s, t, 1.0).item() >= 0


def test_kd_loss_is_zero_iff_equal_and_gradient_points_to_teacher():
    t = torch.tensor([[2.0, 0.0, -1.0]])
    assert kd_loss(t.clone(), t, 3.0).item() == pytest.approx(0.0, abs=1e-12)
    s = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    kd_loss(s, t, 3.0).backward()
    # gradient descent (minus the gradient) raises the logit the teacher prefers and lowers the one it dislikes
    assert -s.grad[0, 0] > 0 and -s.grad[0, 2] < 0


def test_kd_objective_weights_terms():
    rng = np.random.default_rng(3)
    s, t = torch.tensor(rng.normal(size=(6, 4))), torch.tensor(rng.normal(size=(6, 4)))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    out = kd_objective(s, t, y, alpha=0.7, temperature=3.0)
    ce = torch.nn.functional.cross_entropy(s, y).item()
    assert out["ce"].item() == pytest.approx(ce)
    assert out["kd"].item() == pytest.approx(_kd_reference(s.numpy(), t.numpy(), 3.0), rel=1e-9)
    assert out["loss"].item() == pytest.approx(0.7 * out["kd"].item() + 0.3 * ce, rel=1e-9)


def test_temperature_schedules():
    assert temperature_at(0.5, 4.0, 1.0, "constant") == 4.0
    assert temperature_at(0.0, 4.0, 1.0, "linear") == 4.0
    assert temperature_at(0.5, 4.0, 1.0, "linear") == pytest.approx(2.5)
    assert temperature_at(1.0, 4.0, 1.0, "linear") == pytest.approx(1.0)
    assert temperature_at(0.0, 4.0, 1.0, "cosine") == pytest.approx(4.0)
    assert temperature_at(0.5, 4.0, 1.0, "cosine") == pytest.approx(2.5)
    assert temperature_at(1.0, 4.0, 1.0, "cosine") == pytest.approx(1.0)
    assert temperature_at(0.25, 4.0, 1.0, "cosine") == pytest.approx(1.0 + 3.0 * 0.5 * (1 + math.cos(math.pi / 4)))
