"""Distillation losses, one method per file; each math is a pure function of tensors."""

from edgekd.distill.losses.kd import kd_loss, kd_objective, temperature_at

__all__ = ["kd_loss", "kd_objective", "temperature_at"]
