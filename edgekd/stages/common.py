"""Small helpers the stages share: loading the split and the trained models from upstream outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edgekd.compress.pruning import load_pruned
from edgekd.config import check_normalize_channels
from edgekd.data.datasets import Splits
from edgekd.distill.teachers import BatchTeacher, input_shape_for, teacher_for_eval
from edgekd.models.checkpoint import detached_state_dict
from edgekd.models.zoo import model_from_config
from edgekd.pipeline.engine import StageContext


def load_splits(ctx: StageContext) -> Splits:
    """The data stage's split (images stored as uint8 or float32, read as float32 batch by batch). Every model's
    per-channel `normalize` is checked against its channels here too: a cached data stage does not check again."""
    splits = Splits.load(ctx.input_path("data", "splits.npz"))
    check_normalize_channels(ctx.cfg, splits.input_shape[0], ctx.cfg.source)
    return splits


def load_teacher(ctx: StageContext, splits: Splits) -> torch.nn.Module:
    """The teacher as one model taking the dataset's images, (N, C, H, W) -> (N, K): resized for a teacher that
    declares its own `input_size`, and the weighted ensemble when the pipeline lists several `teachers:`."""
    teachers = ctx.cfg.teacher_list()
    return teacher_for_eval(load_teacher_models(ctx, splits), [t.input_size for t in teachers],
                            [t.weight for t in teachers]).eval()


def batch_teacher(ctx: StageContext, splits: Splits) -> tuple[BatchTeacher, Path, list[float]]:
    """The teacher(s) as a training loop runs them, their cached training logits' file, and their weights."""
    teachers = ctx.cfg.teacher_list()
    cache = "train_member_logits.npy" if len(teachers) > 1 else "train_logits.npy"
    return (BatchTeacher(load_teacher_models(ctx, splits), [t.input_size for t in teachers], ctx.cfg.teacher_names()),
            ctx.input_path("teacher", cache), [t.weight for t in teachers])


def teacher_file(i: int, n: int) -> str:
    """The teacher stage's weights of teacher i of n: teacher.pt for a single teacher, teacher_<i>.pt for several."""
    return "teacher.pt" if n == 1 else f"teacher_{i}.pt"


def load_teacher_models(ctx: StageContext, splits: Splits) -> list[torch.nn.Module]:
    """Each teacher's own model (built for its input size, no adapter) with the teacher stage's weights, eval mode."""
    teachers = ctx.cfg.teacher_list()
    models = []
    for i, tcfg in enumerate(teachers):
        model = model_from_config(tcfg, input_shape_for(splits.input_shape, tcfg.input_size), splits.num_classes)
        model.load_state_dict(torch.load(ctx.input_path("teacher", teacher_file(i, len(teachers))), weights_only=True))
        models.append(model.eval())
    return models


def load_student(ctx: StageContext, splits: Splits) -> torch.nn.Module:
    """The current student: the pruned one when the prune stage ran (an input of this stage), else the distilled."""
    model = model_from_config(ctx.cfg.student, splits.input_shape, splits.num_classes)
    if ctx.has_input("prune"):
        shapes = json.loads(ctx.input_path("prune", "student_shapes.json").read_text())
        return load_pruned(model, shapes, ctx.input_path("prune", "student.pt"))
    model.load_state_dict(torch.load(ctx.input_path("distill", "student.pt"), weights_only=True))
    return model.eval()


def sample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed random subset of n rows (all rows if n >= len(x)) as a float32 array; used for calibration and parity
    inputs. x: (N, C, H, W) ImageArray or float32 array."""
    if n >= len(x):
        return np.ascontiguousarray(x[:])
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return np.ascontiguousarray(x[idx])


def save_state_dict(model: torch.nn.Module, path) -> None:
    torch.save(detached_state_dict(model), path)  # keeps module versions: torchvision's MNASNet needs them
