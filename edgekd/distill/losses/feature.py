"""Feature (hint) distillation, FitNets (Romero et al., 2015, "FitNets: Hints for Thin Deep Nets").

The student's intermediate feature map ("guided layer") is mapped by a learned regressor r to the shape of the
teacher's ("hint layer") and pulled towards it: L_HT = 1/2 ||u_h(x) - r(v_g(x))||^2 (their eq. 3). Here r is a 1x1
convolution where the channel counts differ (identity where they match), and the student map is bilinearly
resized where the spatial sizes differ. The squared error is averaged over batch and elements instead of summed
(so the weight does not depend on the layer's size); the pipeline weight absorbs the constant 1/2.

Feature maps are (N, C, H, W); a dense layer's output (N, C) is treated as (N, C, 1, 1), and a transformer's
tokens (N, T, C) as their (N, C, g, g) patch grid (a leading class token dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def as_map(f: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C, 1, 1); (N, C, H, W) unchanged; a transformer's tokens (N, T, C) -> (N, C, g, g) when T is
    g*g patch tokens, or 1 + g*g (the leading class token dropped); anything else is refused."""
    if f.dim() == 2:
        return f[:, :, None, None]
    if f.dim() == 3:
        n, t, c = f.shape
        for skip in (0, 1):
            g = int(round((t - skip) ** 0.5))
            if t - skip >= 1 and g * g == t - skip:
                return f[:, skip:, :].transpose(1, 2).reshape(n, c, g, g)
        raise ValueError(f"feature KD: tokens of shape {tuple(f.shape)} do not form a square patch grid "
                         f"(T = g*g or 1 + g*g)")
    if f.dim() != 4:
        raise ValueError(f"feature KD needs (N, C, H, W), (N, C) or (N, T, C) token features, got shape "
                         f"{tuple(f.shape)}")
    return f


def match_size(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (N, C, H, W) map to `size` (no-op when it already has that size)."""
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    return F.interpolate(f, size=tuple(size), mode="bilinear", align_corners=False)


def hint_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the (already adapted) student map and the teacher map, same shape."""
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"hint_loss: shapes differ: student {tuple(student_map.shape)} vs teacher "
                         f"{tuple(teacher_map.shape)}")
    return (student_map - teacher_map).pow(2).mean()


def _channels(shape: tuple[int, ...]) -> int:
    """Channels of a feature shape without the batch dimension: C of (C,), (C, H, W); the last of tokens (T, C)."""
    return shape[-1] if len(shape) == 2 else shape[0]


class FeatureKD(nn.Module):
    """FitNets hints on several (teacher layer, student layer) pairs -> {"loss": sum of the per-pair hint losses}.

    `shapes` gives, per pair, the (student, teacher) feature shapes without the batch dimension (from one probe
    forward); a 1x1 conv adapter (student channels -> teacher channels) is created where the channels differ.
    Its parameters are trained with the student (the trainer's `extra_params`).
    """

    def __init__(self, shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]):
        super().__init__()
        adapters = []
        for s_shape, t_shape in shapes:
            cs, ct = _channels(s_shape), _channels(t_shape)
            adapters.append(nn.Conv2d(cs, ct, kernel_size=1, bias=False) if cs != ct else nn.Identity())
        self.adapters = nn.ModuleList(adapters)

    def forward(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        total = 0.0
        for adapter, fs, ft in zip(self.adapters, student_feats, teacher_feats):
            ft = as_map(ft)
            total = total + hint_loss(match_size(adapter(as_map(fs)), ft.shape[-2:]), ft.detach())
        return {"loss": total}
