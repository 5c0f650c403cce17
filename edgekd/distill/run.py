"""Distil one model from a frozen teacher with the pipeline's methods: shared by the assistant and distill stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from torch import nn

from edgekd.config import DistillConfig, to_plain
from edgekd.data.datasets import Splits
from edgekd.distill.losses.ensemble import ensemble_logits
from edgekd.distill.objective import FeatureObjective, needs_teacher_features
from edgekd.distill.teachers import BatchTeacher
from edgekd.distill.trainer import KDSettings, TrainResult, train


@dataclass
class DistillRun:
    result: TrainResult
    teacher_output_cache: bool
    cache_note: str
    methods: dict = field(default_factory=dict)


def distill_model(student: nn.Module, cfg: DistillConfig, splits: Splits, teacher: BatchTeacher,
                  cache_file: Optional[Path], teacher_weights: list[float], *, seed: int, work_dir: Path,
                  log: Callable[[str], None], stage: str, amp: bool = True) -> DistillRun:
    """Train `student` in place from `teacher` (and, when usable, its cached training-set logits).

    cache_file: the teacher's logits on the training split, (N, K) for one teacher or (N, M, K) for M teachers,
    as an upstream stage stored them. It is used when `cache_teacher_outputs` is on, `augment` is off and no
    method needs the teacher's intermediate features; otherwise the teacher runs on every batch. `amp`: see `train`.
    """
    methods = cfg.methods.chosen()
    why_forward = needs_teacher_features(cfg.methods)
    if not cfg.cache_teacher_outputs:
        use_cache, note = False, "off in the pipeline (distill.cache_teacher_outputs: false)"
    elif cfg.augment is not None and cfg.augment.active():
        # cached logits are the teacher's answers for the un-augmented images: each augmented batch needs its own
        use_cache, note = False, ("ignored (cache_teacher_outputs: true): augmentation is on, so the teacher runs on "
                                  "every augmented batch")
    elif why_forward:
        use_cache, note = False, f"not used: {why_forward}, so the teacher runs on every batch"
    elif cache_file is None:
        use_cache, note = False, "no cached teacher logits available"
    else:
        use_cache, note = True, "teacher logits computed once upstream, reused every epoch"
    kd = cfg.methods.kd
    settings = KDSettings(cfg.alpha, cfg.temperature, cfg.temperature_schedule, cfg.temperature_end,
                          weight=kd.weight if kd is not None else 0.0,
                          targets=_ensemble_targets(teacher_weights) if len(teacher.models) > 1 else None)
    extra = None
    if set(methods) - {"kd"}:
        extra = FeatureObjective(cfg.methods, cfg.alpha, student, teacher, splits.x_train)
    log("methods: " + ", ".join(f"{name} (weight {m.weight:g})" for name, m in methods.items())
        + f"; label CE weight {1 - cfg.alpha:g}, teacher terms x alpha={cfg.alpha:g}; teacher output cache: {note}")
    try:
        result = train(student, cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val, seed=seed,
                       work_dir=work_dir, log=log, stage=stage, kd=settings, amp=amp,
                       teacher_logits=np.load(cache_file) if use_cache else None, teacher=teacher,
                       extra_loss=extra, extra_params=list(extra.parameters()) if extra is not None else None)
    finally:
        if extra is not None:
            extra.close()
    return DistillRun(result, use_cache, note, {name: to_plain(m) for name, m in methods.items()})


def _ensemble_targets(weights: list[float]) -> Callable:
    return lambda member_logits, temperature: ensemble_logits(member_logits, weights, temperature)
