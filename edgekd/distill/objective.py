"""The pipeline's distillation methods assembled into one training objective.

    loss = (1 - alpha) * CE(labels) + alpha * ( w_kd * KD + w_feature * FitNets + w_attention * AT + w_rkd * RKD )

The trainer computes the first two terms (label CE and logit KD, from the teacher output cache when it can);
`FeatureObjective` is its `extra_loss` for the rest: it taps the student's and the teacher's intermediate
outputs by module path (forward hooks, no surgery), owns the FitNets adapters (trained with the student) and
returns the weighted sum plus each method's value for the training log.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from edgekd.config import MethodsConfig
from edgekd.distill.hooks import FeatureTap, penultimate_path, resolve
from edgekd.distill.losses.attention import AttentionKD
from edgekd.distill.losses.feature import FeatureKD
from edgekd.distill.losses.relational import RelationalKD
from edgekd.distill.teachers import BatchTeacher
from edgekd.errors import ConfigError


def needs_teacher_features(methods: MethodsConfig) -> Optional[str]:
    """Why the teacher must run on every batch (its intermediate outputs are needed), or None."""
    if methods.feature is not None:
        return "feature KD reads the teacher's intermediate feature maps"
    if methods.attention is not None:
        return "attention transfer reads the teacher's intermediate feature maps"
    if methods.rkd is not None and (methods.rkd.pair is not None or methods.rkd.embedding == "penultimate"):
        return "RKD on intermediate embeddings reads the teacher's features"
    return None


class _Taps:
    """Student-side and teacher-side taps for a list of (teacher path, student path) pairs."""

    def __init__(self, student: nn.Module, teacher: BatchTeacher, pairs: list[list[str]], where: str,
                 use_input: bool = False):
        self.student = FeatureTap(student, [s for _, s in pairs], f"{where} (student)", [use_input] * len(pairs))
        self.teacher = []
        for t_path, _ in pairs:
            model, inner = teacher.model_at(t_path, where)
            self.teacher.append(FeatureTap(model, [inner], f"{where} (teacher {t_path})", [use_input]))

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.student.take(), [tap.take()[0] for tap in self.teacher]

    def close(self) -> None:
        for tap in (self.student, *self.teacher):
            tap.close()


class FeatureObjective(nn.Module):
    """extra_loss for the trainer: alpha * sum of the weighted feature-level methods (FitNets, AT, RKD).

    Built with one probe batch (to learn the feature shapes and create the FitNets adapters); call `close()` after
    training to remove the hooks. Its parameters (the adapters) must be trained with the student.
    """

    def __init__(self, methods: MethodsConfig, alpha: float, student: nn.Module, teacher: BatchTeacher,
                 probe_x: np.ndarray, where: str = "distill.methods"):
        super().__init__()
        self.alpha = alpha
        self._teacher = (teacher,)  # held, not registered: the frozen teacher's weights are not this module's
        self.weights: dict[str, float] = {}
        self.taps: dict[str, _Taps] = {}
        self.rkd_source: Optional[str] = None
        try:
            if methods.feature is not None:
                self.taps["feature"] = _Taps(student, teacher, methods.feature.pairs, f"{where}.feature.pairs")
                self.weights["feature"] = methods.feature.weight
            if methods.attention is not None:
                self.taps["attention"] = _Taps(student, teacher, methods.attention.pairs, f"{where}.attention.pairs")
                self.weights["attention"] = methods.attention.weight
                self.attention = AttentionKD(methods.attention.p)
            if methods.rkd is not None:
                self._init_rkd(methods.rkd, student, teacher, f"{where}.rkd")
            shapes = self._probe(student, teacher, probe_x) if self.taps else {}
            if "feature" in self.taps:
                self.feature = FeatureKD(shapes["feature"])
            if "attention" in self.taps:
                bad = [(s, t) for s, t in shapes["attention"] if len(s) != 3 or len(t) != 3]
                if bad:
                    raise ConfigError(f"{where}.attention.pairs: attention transfer needs convolutional feature maps "
                                      f"(C, H, W); got {bad[0][1]} (teacher) and {bad[0][0]} (student)")
        except Exception:
            self.close()
            raise

    def _init_rkd(self, rkd, student: nn.Module, teacher: BatchTeacher, where: str) -> None:
        self.weights["rkd"] = rkd.weight
        self.rkd = RelationalKD(rkd.distance, rkd.angle)
        if rkd.pair is not None:
            self.taps["rkd"] = _Taps(student, teacher, [rkd.pair], f"{where}.pair")
            self.rkd_source = "modules"
        elif rkd.embedding == "penultimate":
            if len(teacher.models) > 1:
                raise ConfigError(f"{where}: with several teachers, give `pair: [NAME/PATH, student path]` or use "
                                  f"embedding: logits (the ensemble's)")
            pairs = [[penultimate_path(teacher.models[0]), penultimate_path(student)]]
            self.taps["rkd"] = _Taps(student, teacher, pairs, where, use_input=True)
            self.rkd_source = "penultimate"
        else:
            self.rkd_source = "logits"

    @torch.no_grad()
    def _probe(self, student: nn.Module, teacher: BatchTeacher, x: np.ndarray) -> dict[str, list]:
        """One forward of both on a few real images, to learn each tapped output's shape (batch dim dropped)."""
        was_training = student.training
        student.eval()
        teacher.eval()
        xb = torch.from_numpy(np.ascontiguousarray(x[:4]))
        student(xb)
        teacher(xb)
        teacher.forget()
        student.train(was_training)
        shapes = {}
        for name, taps in self.taps.items():
            s, t = taps.take()
            shapes[name] = [(tuple(a.shape[1:]), tuple(b.shape[1:])) for a, b in zip(s, t)]
        return shapes

    def forward(self, student_logits: torch.Tensor, batch_x: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        if self.taps:
            with torch.no_grad():
                self._teacher[0](batch_x)  # no-op when the trainer already ran the teacher on this batch
        terms: dict[str, torch.Tensor] = {}
        total = student_logits.new_zeros(())
        for name, weight in self.weights.items():
            if name == "feature":
                out = self.feature(*self.taps["feature"].take())
            elif name == "attention":
                out = self.attention(*self.taps["attention"].take())
            else:
                if self.rkd_source == "logits":
                    if teacher_logits is None:
                        raise RuntimeError("RKD on logits needs the teacher's logits for the batch")
                    s_emb, t_emb = student_logits, teacher_logits
                else:
                    (s_emb,), (t_emb,) = self.taps["rkd"].take()
                out = self.rkd(s_emb, t_emb)
            total = total + self.alpha * weight * out["loss"]
            terms[name] = out["loss"].detach()
            terms.update({k: v for k, v in out.items() if k != "loss"})
        terms["loss"] = total
        return terms

    def close(self) -> None:
        for taps in self.taps.values():
            taps.close()


def check_paths(methods: MethodsConfig, student: nn.Module, teachers: dict[str, nn.Module], where: str) -> None:
    """Every module path the methods name exists in its model (ConfigError with did-you-mean otherwise).

    `teachers` maps names to models; with one teacher, paths have no NAME/ prefix.
    """
    batch_teacher = BatchTeacher(list(teachers.values()), [None] * len(teachers), list(teachers))
    sections = [("feature", "pairs"), ("attention", "pairs"), ("rkd", "pair")]
    for method, key in sections:
        section = getattr(methods, method)
        pairs = getattr(section, key, None) if section is not None else None
        if not pairs:
            continue
        for i, (t_path, s_path) in enumerate([pairs] if key == "pair" else pairs):
            at = f"{where}.{method}.{key}" + ("" if key == "pair" else f"[{i}]")
            model, inner = batch_teacher.model_at(t_path, at)
            resolve(model, inner, f"{at}[0] (teacher)")
            resolve(student, s_path, f"{at}[1] (student)")
