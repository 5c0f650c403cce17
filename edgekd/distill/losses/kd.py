"""Logit distillation (Hinton et al., 2015): soft targets at temperature T, scaled by T^2."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Batch-mean T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    Shapes: student_logits, teacher_logits (N, K) -> scalar. `F.kl_div(input, target)` computes KL(target || input)
    with `input` as log-probabilities, so the student's log-softmax goes first. The T^2 factor keeps the soft-target
    gradients on the same scale as the hard-label ones when T changes.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def kd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 alpha: float, temperature: float, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """alpha * weight * kd_loss + (1 - alpha) * cross-entropy(labels); named terms for logging, total in "loss".

    `weight` is the KD term's share of alpha when other methods (feature, attention, RKD) share it too.
    """
    kd = kd_loss(student_logits, teacher_logits, temperature)
    ce = F.cross_entropy(student_logits, labels)
    return {"loss": alpha * weight * kd + (1.0 - alpha) * ce, "kd": kd.detach(), "ce": ce.detach()}


def temperature_at(progress: float, start: float, end: float | None, schedule: str) -> float:
    """Temperature after `progress` in [0, 1] of training: constant, linear or cosine decay from start to end."""
    if schedule == "constant" or end is None:
        return start
    p = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown temperature schedule {schedule!r}")
