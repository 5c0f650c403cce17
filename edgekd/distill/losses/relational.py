"""Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019, "Relational Knowledge Distillation").

The student matches the *structure* of the teacher's embeddings within a batch, not the embeddings themselves,
so the two may have different dimensions. With t_i, s_i the teacher's and student's embeddings of example i:

  distance-wise (RKD-D):  psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu,  mu = mean distance over the batch's pairs;
                          L_D = mean over pairs i != j of huber(psi_D(s_i, s_j), psi_D(t_i, t_j))
  angle-wise    (RKD-A):  psi_A(t_i, t_j, t_k) = cos of the angle at t_j = <e_ij, e_kj>,
                          e_ij = (t_i - t_j) / ||t_i - t_j||_2;
                          L_A = mean over triplets of distinct i, j, k of huber(psi_A(s...), psi_A(t...))

huber is the Huber loss with delta = 1 (PyTorch's smooth L1). The paper weighs them lambda_D = 25, lambda_A = 50.
Its tuple sets are of distinct examples; degenerate tuples (i = j, ...) are excluded here rather than averaged in
as zeros, so values are exact means over the paper's sets. The teacher's side carries no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N, D) -> (N, N) Euclidean distances (diagonal exactly 0; gradient-safe at 0)."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt()
    return d * (1.0 - torch.eye(len(e), dtype=e.dtype, device=e.device))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D on (N, Ds) student and (N, Dt) teacher embeddings, N >= 2."""
    n = len(student)
    if n < 2:
        raise ValueError("RKD needs at least 2 examples per batch")
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    with torch.no_grad():
        t_d = pairwise_distances(teacher.flatten(1))[off]
        t_d = t_d / t_d.mean().clamp(min=1e-12)
    s_d = pairwise_distances(student.flatten(1))[off]
    s_d = s_d / s_d.mean().clamp(min=1e-12)
    return F.smooth_l1_loss(s_d, t_d, beta=1.0)


def angle_cosines(e: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N, N) tensor c[j, i, k] = <e_ij, e_kj>, the cosine of the angle at vertex j."""
    diff = e[None, :, :] - e[:, None, :]  # diff[j, i] = e_i - e_j
    unit = F.normalize(diff, p=2, dim=2)
    return unit @ unit.transpose(1, 2)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A on (N, Ds) student and (N, Dt) teacher embeddings, N >= 3; mean over triplets of distinct examples."""
    n = len(student)
    if n < 3:
        raise ValueError("RKD's angle loss needs at least 3 examples per batch")
    idx = torch.arange(n, device=student.device)
    distinct = ((idx[:, None, None] != idx[None, :, None]) & (idx[:, None, None] != idx[None, None, :])
                & (idx[None, :, None] != idx[None, None, :]))
    with torch.no_grad():
        t_a = angle_cosines(teacher.flatten(1))[distinct]
    s_a = angle_cosines(student.flatten(1))[distinct]
    return F.smooth_l1_loss(s_a, t_a, beta=1.0)


class RelationalKD(torch.nn.Module):
    """lambda_D * RKD-D + lambda_A * RKD-A on a batch's embeddings -> {"loss", "rkd_distance", "rkd_angle"}."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        zero = student.new_zeros(())
        dist = rkd_distance_loss(student, teacher) if self.distance_weight else zero
        angle = rkd_angle_loss(student, teacher) if self.angle_weight else zero
        return {"loss": self.distance_weight * dist + self.angle_weight * angle,
                "rkd_distance": dist.detach(), "rkd_angle": angle.detach()}
