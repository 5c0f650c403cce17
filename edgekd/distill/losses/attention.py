"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention").

Activation-based spatial attention of a feature map A (N, C, H, W): F(A) = sum over channels of |A_c|^p (p = 2),
flattened to Q (N, H*W) and L2-normalized per sample. The paper's objective (eq. 2) is

    L = L_CE + beta/2 * sum_j || Q_S^j / ||Q_S^j||_2  -  Q_T^j / ||Q_T^j||_2 ||_p        (p = 2)

and the authors' reference code (github.com/szagoruyko/attention-transfer, `at_loss`) computes each layer's term
as the mean over batch and positions of the SQUARED difference of the normalized maps, with beta = 1000 — the form
their reported results and beta were tuned with. `attention_loss` implements that code form (mean squared
distance, independent of batch and map size); the pipeline weight plays beta (default 1000). The normalization
makes sum vs mean over channels irrelevant.

Where the student's map has another spatial size than the teacher's, the student's attention map is bilinearly
resized to the teacher's before normalization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgekd.distill.losses.feature import match_size


def attention_map(features: torch.Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): sum_c |A_c|^p, optionally resized to `size`, flattened, L2-normalized per row."""
    if features.dim() != 4:
        raise ValueError(f"attention transfer needs (N, C, H, W) feature maps, got shape {tuple(features.shape)}")
    a = features.abs().pow(p).sum(dim=1, keepdim=True)
    if size is not None:
        a = match_size(a, size)
    return F.normalize(a.flatten(1), p=2, dim=1)


def attention_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean over batch and positions of (Q_S/||Q_S|| - Q_T/||Q_T||)^2 for one layer pair (teacher held fixed)."""
    q_t = attention_map(teacher_features.detach(), p)
    q_s = attention_map(student_features, p, size=tuple(teacher_features.shape[-2:]))
    return (q_s - q_t).pow(2).mean()


class AttentionKD(torch.nn.Module):
    """Attention transfer on several (teacher layer, student layer) pairs -> {"loss": sum over pairs} (paper: sum_j)."""

    def __init__(self, p: float = 2.0):
        super().__init__()
        self.p = p

    def forward(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        total = 0.0
        for fs, ft in zip(student_feats, teacher_feats):
            total = total + attention_loss(fs, ft, self.p)
        return {"loss": total}
