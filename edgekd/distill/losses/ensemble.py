"""Multi-teacher soft targets: several teachers' outputs combined into the one target the KD loss matches.

The ensemble's soft target at the distillation temperature T is the weighted arithmetic mean of the members'
softened distributions, as Hinton et al. (2015, sec. 2) form an ensemble's soft targets:

    q_T = sum_m w_m softmax(z_m / T)          (weights normalized to sum to 1)

`ensemble_logits` returns logits z = T * log(q_T), so that softmax(z / T) = q_T and the ordinary `kd_loss` applies
unchanged. z depends on T, so it is recomputed per batch (cheap) when T follows a schedule. At T = 1 it is the log
of the ensemble's predictive distribution: its argmax is the ensemble's prediction.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def normalized_weights(weights: Sequence[float] | torch.Tensor, m: int, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).reshape(-1)
    if w.numel() != m:
        raise ValueError(f"{w.numel()} teacher weights for {m} teachers")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("teacher weights must be >= 0 with a positive sum")
    return w / w.sum()


def ensemble_logits(member_logits: torch.Tensor, weights: Sequence[float] | torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """(N, M, K) logits of M teachers -> (N, K) logits z with softmax(z / T) = sum_m w_m softmax(z_m / T)."""
    if member_logits.dim() != 3:
        raise ValueError(f"expected (N, M, K) member logits, got shape {tuple(member_logits.shape)}")
    w = normalized_weights(weights, member_logits.shape[1], member_logits)
    return mix(member_logits, torch.log(w), temperature)


def mix(member_logits: torch.Tensor, log_weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """`ensemble_logits` with already normalized log-weights and no checks (traceable for ONNX export)."""
    t = float(temperature)
    return t * torch.logsumexp(F.log_softmax(member_logits / t, dim=2) + log_weights[None, :, None], dim=1)
