"""Feature KD, attention transfer, relational KD and multi-teacher targets, each against an independent numpy
computation of its formula (values) and a check of its gradient's direction, on small random tensors."""

import itertools
import math

import numpy as np
import pytest
import torch

from edgekd.distill.losses import kd_loss
from edgekd.distill.losses.attention import AttentionKD, attention_loss, attention_map
from edgekd.distill.losses.ensemble import ensemble_logits
from edgekd.distill.losses.feature import FeatureKD, hint_loss
from edgekd.distill.losses.relational import RelationalKD, rkd_angle_loss, rkd_distance_loss


# ----------------------------------------------------------------------------------- independent references

def _bilinear(a, out_h, out_w):
    """numpy bilinear resize of (..., H, W) with half-pixel centres (PyTorch's align_corners=False)."""
    h, w = a.shape[-2:]

    def axis(n_in, n_out):
        rows = []
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            lam = src - i0
            row = np.zeros(n_in)
            row[i0] += 1 - lam
            row[i1] += lam
            rows.append(row)
        return np.array(rows)

    return np.einsum("ih,...hw,jw->...ij", axis(h, out_h), a, axis(w, out_w))


def _huber(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def _softmax(z, t=1.0):
    e = np.exp((z - z.max(axis=-1, keepdims=True)) / t)
    return e / e.sum(axis=-1, keepdims=True)


def _t(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _descends(loss_fn, x: torch.Tensor, step: float = 1e-3) -> bool:
    """A small step against the gradient lowers the loss (the gradient points the right way)."""
    x = x.detach().clone().requires_grad_(True)
    loss = loss_fn(x)
    (g,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        after = loss_fn(x - step * g / g.norm())
    return after.item() < loss.item()


rng = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------- FitNets

def test_hint_loss_is_mean_squared_error_and_gradient_points_to_teacher():
    s, t = rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 4, 5, 5))
    st = _t(s, grad=True)
    loss = hint_loss(st, _t(t))
    assert loss.item() == pytest.approx(np.mean((s - t) ** 2), rel=1e-12)
    loss.backward()
    assert np.allclose(st.grad.numpy(), 2 * (s - t) / s.size)  # -grad is along (teacher - student)


def test_feature_kd_adapter_and_resize_match_the_formula():
    """student (N, 3, 4, 4) -> 1x1 conv to 5 channels -> bilinear to 8x8 -> MSE against the teacher (N, 5, 8, 8)."""
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 8, 8))
    fkd = FeatureKD([((3, 4, 4), (5, 8, 8))]).double()
    w = fkd.adapters[0].weight.detach().numpy()[:, :, 0, 0]  # (5, 3)
    adapted = np.einsum("oc,nchw->nohw", w, s)
    ref = np.mean((_bilinear(adapted, 8, 8) - t) ** 2)
    out = fkd([_t(s)], [_t(t)])
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)


def test_feature_kd_identity_where_channels_match_and_dense_features():
    fkd = FeatureKD([((6,), (6,)), ((4, 3, 3), (4, 3, 3))])
    assert isinstance(fkd.adapters[0], torch.nn.Identity) and isinstance(fkd.adapters[1], torch.nn.Identity)
    s1, t1 = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    s2, t2 = rng.normal(size=(5, 4, 3, 3)), rng.normal(size=(5, 4, 3, 3))
    out = fkd([_t(s1), _t(s2)], [_t(t1), _t(t2)])
    assert out["loss"].item() == pytest.approx(np.mean((s1 - t1) ** 2) + np.mean((s2 - t2) ** 2), rel=1e-10)


def test_feature_kd_trains_the_adapter_and_the_student_towards_the_teacher():
    torch.manual_seed(0)
    fkd = FeatureKD([((3, 4, 4), (6, 4, 4))]).double()
    s, t = _t(rng.normal(size=(4, 3, 4, 4)), grad=True), _t(rng.normal(size=(4, 6, 4, 4)))
    fkd([s], [t])["loss"].backward()
    assert fkd.adapters[0].weight.grad is not None and fkd.adapters[0].weight.grad.abs().sum() > 0
    assert _descends(lambda x: fkd([x], [t])["loss"], s)


# ------------------------------------------------------------------------------------- attention transfer

def _at_map_ref(a, p=2.0, size=None):
    m = np.sum(np.abs(a) ** p, axis=1)  # (N, H, W)
    if size is not None and m.shape[-2:] != size:
        m = _bilinear(m, *size)
    q = m.reshape(len(m), -1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_map_is_normalized_channel_sum_of_powers(p):
    a = rng.normal(size=(3, 7, 4, 5))
    got = attention_map(_t(a), p).numpy()
    assert np.allclose(got, _at_map_ref(a, p), atol=1e-12)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_attention_loss_matches_the_mean_squared_distance_of_normalized_maps():
    s, t = rng.normal(size=(4, 3, 6, 6)), rng.normal(size=(4, 8, 6, 6))  # channel counts may differ
    ref = np.mean((_at_map_ref(s) - _at_map_ref(t)) ** 2)
    assert attention_loss(_t(s), _t(t)).item() == pytest.approx(ref, rel=1e-10)


def test_attention_loss_resizes_the_student_map_to_the_teacher_size():
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 8, 8))
    ref = np.mean((_at_map_ref(s, size=(8, 8)) - _at_map_ref(t)) ** 2)
    assert attention_loss(_t(s), _t(t)).item() == pytest.approx(ref, rel=1e-10)


def test_attention_loss_is_scale_invariant_zero_at_the_teacher_and_descends():
    t = rng.normal(size=(3, 4, 5, 5))
    assert attention_loss(_t(3.0 * t), _t(t)).item() == pytest.approx(0.0, abs=1e-14)
    s = _t(rng.normal(size=(3, 4, 5, 5)))
    assert _descends(lambda x: attention_loss(x, _t(t)), s)
    pairs = AttentionKD()([s, s], [_t(t), _t(t)])["loss"].item()  # the paper sums over layer pairs
    assert pairs == pytest.approx(2 * attention_loss(s, _t(t)).item(), rel=1e-12)


# ----------------------------------------------------------------------------------------- relational KD

def _rkd_distance_ref(s, t):
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ds = np.array([np.linalg.norm(s[i] - s[j]) for i, j in pairs])
    dt = np.array([np.linalg.norm(t[i] - t[j]) for i, j in pairs])
    ds, dt = ds / ds.mean(), dt / dt.mean()
    return np.mean([_huber(a, b) for a, b in zip(ds, dt)])


def _cos_at(e, i, j, k):
    u, v = e[i] - e[j], e[k] - e[j]
    return u @ v / (np.linalg.norm(u) * np.linalg.norm(v))


def _rkd_angle_ref(s, t):
    triplets = [c for c in itertools.product(range(len(s)), repeat=3) if len(set(c)) == 3]
    return np.mean([_huber(_cos_at(s, *c), _cos_at(t, *c)) for c in triplets])


def test_rkd_distance_matches_the_paper():
    s, t = rng.normal(size=(6, 4)), rng.normal(size=(6, 9)) * 5  # dimensions and scales may differ
    assert rkd_distance_loss(_t(s), _t(t)).item() == pytest.approx(_rkd_distance_ref(s, t), rel=1e-10)


def test_rkd_angle_matches_the_paper():
    s, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 7))
    assert rkd_angle_loss(_t(s), _t(t)).item() == pytest.approx(_rkd_angle_ref(s, t), rel=1e-10)


def test_rkd_huber_branch_for_large_differences():
    """Distances far apart hit the linear branch of the Huber loss (|d| > 1)."""
    t = np.array([[0.0], [1.0], [2.0], [30.0]])
    s = np.array([[0.0], [10.0], [20.0], [21.0]])
    assert rkd_distance_loss(_t(s), _t(t)).item() == pytest.approx(_rkd_distance_ref(s, t), rel=1e-10)


def test_rkd_is_zero_for_a_scaled_copy_and_descends():
    t = rng.normal(size=(6, 5))
    assert rkd_distance_loss(_t(2.5 * t), _t(t)).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_angle_loss(_t(2.5 * t + 1.0), _t(t)).item() == pytest.approx(0.0, abs=1e-12)
    s = _t(rng.normal(size=(6, 3)))
    assert _descends(lambda x: rkd_distance_loss(x, _t(t)), s)
    assert _descends(lambda x: rkd_angle_loss(x, _t(t)), s)


def test_rkd_module_weighs_the_two_terms_and_leaves_the_teacher_without_gradient():
    s, t = _t(rng.normal(size=(5, 3)), grad=True), _t(rng.normal(size=(5, 4)), grad=True)
    out = RelationalKD(distance_weight=25, angle_weight=50)(s, t)
    ref = 25 * _rkd_distance_ref(s.detach().numpy(), t.detach().numpy()) + \
        50 * _rkd_angle_ref(s.detach().numpy(), t.detach().numpy())
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)
    out["loss"].backward()
    assert t.grad is None and s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- multi-teacher targets

@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_ensemble_soft_targets_are_the_weighted_mean_of_softened_distributions(temp):
    z = rng.normal(size=(5, 3, 7)) * 3  # (N, M teachers, K classes)
    w = np.array([1.0, 2.0, 0.5])
    q = np.einsum("m,nmk->nk", w / w.sum(), _softmax(z, temp))
    got = ensemble_logits(_t(z), w, temp)
    assert np.allclose(_softmax(got.numpy(), temp), q, atol=1e-12)
    # and KD against it is T^2 * KL(q || p_student), written out
    s = rng.normal(size=(5, 7))
    p_s = _softmax(s, temp)
    ref = temp**2 * np.mean(np.sum(q * (np.log(q) - np.log(p_s)), axis=1))
    assert kd_loss(_t(s), got, temp).item() == pytest.approx(ref, rel=1e-9)


def test_one_teacher_ensemble_is_that_teacher_and_zero_weight_ignores_a_member():
    z = rng.normal(size=(4, 1, 6))
    got = ensemble_logits(_t(z), [3.0], 2.0).numpy()
    assert np.allclose(_softmax(got, 2.0), _softmax(z[:, 0], 2.0), atol=1e-12)
    z2 = rng.normal(size=(4, 2, 6))
    got = ensemble_logits(_t(z2), [1.0, 0.0], 2.0).numpy()
    assert np.allclose(_softmax(got, 2.0), _softmax(z2[:, 0], 2.0), atol=1e-12)


def test_kd_towards_an_ensemble_moves_the_student_to_the_averaged_targets():
    z = _t(rng.normal(size=(3, 2, 4)) * 2)
    target = ensemble_logits(z, [1.0, 1.0], 3.0)
    s = _t(rng.normal(size=(3, 4)))
    assert _descends(lambda x: kd_loss(x, target, 3.0), s)
    with pytest.raises(ValueError, match="2 teacher weights for 3 teachers"):
        ensemble_logits(_t(rng.normal(size=(2, 3, 4))), [1.0, 1.0])
