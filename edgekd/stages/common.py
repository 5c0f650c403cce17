"""Small helpers the stages share: loading the split and the trained models from upstream outputs."""

from __future__ import annotations

import numpy as np
import torch

from edgekd.data.datasets import Splits
from edgekd.models.zoo import model_from_config
from edgekd.pipeline.engine import StageContext


def load_splits(ctx: StageContext) -> Splits:
    return Splits.load(ctx.input_path("data", "splits.npz"))


def load_teacher(ctx: StageContext, splits: Splits) -> torch.nn.Module:
    model = model_from_config(ctx.cfg.teacher, splits.input_shape, splits.num_classes)
    model.load_state_dict(torch.load(ctx.input_path("teacher", "teacher.pt"), weights_only=True))
    return model.eval()


def load_student(ctx: StageContext, splits: Splits) -> torch.nn.Module:
    model = model_from_config(ctx.cfg.student, splits.input_shape, splits.num_classes)
    model.load_state_dict(torch.load(ctx.input_path("distill", "student.pt"), weights_only=True))
    return model.eval()


def sample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed random subset of n rows (all rows if n >= len(x)); used for calibration and parity inputs."""
    if n >= len(x):
        return x
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return np.ascontiguousarray(x[idx])


def save_state_dict(model: torch.nn.Module, path) -> None:
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
