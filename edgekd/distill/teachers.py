"""Teachers as the rest of edgekd sees them: input adapter, ensembles, and the per-batch teacher of the trainer.

- `with_input_size`: the teacher input adapter. Each model bakes its own normalization (its first layer), so only
  the input size needs adapting: a teacher that expects [H, W] gets each batch bilinearly resized to it.
- `Ensemble`: several teachers as one model, (N, C, H, W) -> (N, K) log of the weighted mean of the members'
  probabilities; used to evaluate, export and benchmark "the teacher" when the pipeline lists `teachers:`.
- `BatchTeacher`: the frozen teacher(s) as the training loop calls them. It runs at most once per batch (the KD term
  and the feature terms share one forward), returns (N, K) logits for one teacher or (N, M, K) for M teachers
  (combined into soft targets at the current temperature by `losses.ensemble`), and exposes each member's own
  model so feature taps can be placed by module path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.distill.losses.ensemble import mix, normalized_weights
from edgekd.errors import ConfigError


class ResizeInput(nn.Module):
    """Bilinear resize of (N, C, H, W) images to `size` = [H', W'] (a no-op for images of that size)."""

    def __init__(self, size: Sequence[int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def with_input_size(model: nn.Module, size: Optional[Sequence[int]]) -> nn.Module:
    """The teacher input adapter: `model` fed through a resize to `size`; `model` itself when size is None."""
    return model if not size else nn.Sequential(ResizeInput(size), model)


def input_shape_for(data_shape: Sequence[int], size: Optional[Sequence[int]]) -> tuple[int, int, int]:
    """The (C, H, W) a teacher is built for: the data's, with H, W replaced by its declared input size."""
    c, h, w = data_shape
    return (int(c), int(size[0]), int(size[1])) if size else (int(c), int(h), int(w))


class Ensemble(nn.Module):
    """Several teachers as one model: (N, C, H, W) -> (N, K) log of sum_m w_m softmax(z_m).

    Its softmax is the ensemble's predictive distribution and its argmax the ensemble's prediction; members are
    already input-adapted modules.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("log_weights", normalized_weights(weights, len(members), torch.zeros(())).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mix(torch.stack([m(x) for m in self.members], dim=1), self.log_weights, 1.0)


def teacher_for_eval(models: Sequence[nn.Module], sizes: Sequence[Optional[Sequence[int]]],
                     weights: Sequence[float]) -> nn.Module:
    """One module taking the dataset's images: the (input-adapted) teacher, or the Ensemble of several."""
    adapted = [with_input_size(m, s) for m, s in zip(models, sizes)]
    return adapted[0] if len(adapted) == 1 else Ensemble(adapted, weights)


class BatchTeacher(nn.Module):
    """The frozen teacher(s) the trainer runs: forward(x) -> (N, K) logits, or (N, M, K) for M teachers.

    Calling it again with the very same batch tensor returns the stored result without running the teachers
    again, so the trainer's KD term and the feature-level terms share one teacher forward per batch.
    """

    def __init__(self, models: Sequence[nn.Module], sizes: Sequence[Optional[Sequence[int]]], names: Sequence[str]):
        super().__init__()
        self.models = nn.ModuleList(models)  # each teacher's own model: module paths as the pipeline names them
        self.adapted = [with_input_size(m, s) for m, s in zip(models, sizes)]
        self.names = list(names)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        outs = [m(x) for m in self.adapted]
        out = outs[0] if len(outs) == 1 else torch.stack(outs, dim=1)
        self._last = (x, out)
        return out

    def forget(self) -> None:
        self._last = None

    def model_at(self, path: str, where: str) -> tuple[nn.Module, str]:
        """(the teacher model, the module path inside it) for a pipeline path: PATH, or NAME/PATH with teachers:."""
        if "/" in path:
            name, inner = path.split("/", 1)
            if name not in self.names:
                raise ConfigError(f"{where}: {path!r}: no teacher named {name!r} (teachers: {', '.join(self.names)})")
            return self.models[self.names.index(name)], inner
        if len(self.models) > 1:
            raise ConfigError(f"{where}: {path!r}: with several teachers, name the one to read from as NAME/PATH "
                              f"(teachers: {', '.join(self.names)})")
        return self.models[0], path
