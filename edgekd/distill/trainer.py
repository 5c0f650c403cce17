"""The training loop, readable top to bottom: used to train a teacher (alpha = 0, no teacher) and to distil a student.

Checkpoints every epoch into `work_dir` (model, optimizer, schedule, history, RNG), so a killed run resumes from
the last finished epoch. A NaN or infinite loss stops training with a clear error; the last good checkpoint stays.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.config import TrainConfig
from edgekd.distill.losses import kd_objective, temperature_at
from edgekd.errors import StageError
from edgekd.pipeline.store import atomic_write_bytes


@dataclass
class KDSettings:
    alpha: float
    temperature: float
    schedule: str = "constant"
    temperature_end: Optional[float] = None
    weight: float = 1.0  # of the KD term within alpha's share: alpha * weight * KD + (1 - alpha) * CE
    # maps a batch's teacher output to the logits KD matches at temperature T, e.g. several teachers'
    # (B, M, K) logits to the ensemble's soft targets: targets(teacher_out, T) -> (B, K)
    targets: Optional[Callable[[torch.Tensor, float], torch.Tensor]] = None


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    seconds: float = 0.0

    @property
    def val_accuracy(self) -> float:
        return self.history[-1]["val_accuracy"] if self.history else float("nan")


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Eval-mode logits. x: (N, C, H, W) float32 -> (N, K) float32."""
    was_training = model.training
    model.eval()
    out = [model(torch.from_numpy(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")


def train(model: nn.Module, cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray,
          x_val: np.ndarray, y_val: np.ndarray, *, seed: int, work_dir: Path,
          kd: Optional[KDSettings] = None, teacher_logits: Optional[np.ndarray] = None,
          teacher: Optional[nn.Module] = None, extra_loss: Optional[Callable] = None,
          extra_params: Optional[list] = None, log: Callable[[str], None] = print, stage: str = "train") -> TrainResult:
    """Train `model` in place.

    x_train: (N, C, H, W) float32, y_train: (N,) int64. With `kd`, the soft targets come from `teacher_logits`
    ((N, K), precomputed: the teacher output cache) or else from running the frozen `teacher` on each batch
    (several teachers: (N, M, K) outputs, turned into the ensemble's targets by `kd.targets`).
    `extra_loss(student_logits, batch_x, teacher_logits) -> dict of named terms` adds feature-level losses (its
    "loss" is added to the total; `teacher_logits` is the batch's teacher output as the KD term used it, None
    without `kd`); `extra_params` (e.g. its adapters) are optimized and checkpointed with the model.
    """
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    extra_params = list(extra_params or [])
    params = list(model.parameters()) + extra_params
    optimizer = _optimizer(cfg, params)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
                 if cfg.lr_schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))

    # ---- resume from the last finished epoch, if a previous attempt left one
    result = TrainResult()
    start_epoch = 0
    ckpt_path = work_dir / "checkpoint.pt"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        with torch.no_grad():
            for p, saved in zip(extra_params, state.get("extra_params", [])):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        result.history = [dict(zip(state["history_keys"], row.tolist())) for row in state["history"]]
        result.resumed_from_epoch = start_epoch
        log(f"resuming from the checkpoint after epoch {start_epoch}/{cfg.epochs}")

    x_t, y_t = torch.from_numpy(x_train), torch.from_numpy(y_train)
    t_logits = torch.from_numpy(teacher_logits) if teacher_logits is not None else None
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = torch.from_numpy(np.random.default_rng(seed * 1000 + epoch).permutation(len(x_train)))
        torch.manual_seed(seed * 1000 + epoch)
        sums: dict[str, float] = {}
        n_seen = 0
        temperature = None
        bar = _progress(steps_per_epoch, f"{stage} epoch {epoch + 1}/{cfg.epochs}")
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb, yb = x_t[idx], y_t[idx]
            logits = model(xb)
            tb = None
            if kd is not None:
                progress = (epoch * steps_per_epoch + step) / max(1, total_steps - 1)
                temperature = temperature_at(progress, kd.temperature, kd.temperature_end, kd.schedule)
                if t_logits is not None:
                    tb = t_logits[idx]
                else:
                    with torch.no_grad():
                        tb = teacher(xb)
                if kd.targets is not None:
                    tb = kd.targets(tb, temperature)
                terms = kd_objective(logits, tb, yb, kd.alpha, temperature, kd.weight)
            else:
                ce = F.cross_entropy(logits, yb)
                terms = {"loss": ce, "ce": ce.detach()}
            if extra_loss is not None:
                extra = extra_loss(logits, xb, tb)
                terms["loss"] = terms["loss"] + extra.pop("loss")
                terms.update({k: v.detach() for k, v in extra.items()})
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise StageError(stage, f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                        f"lower the learning rate ({cfg.lr}); the last good checkpoint "
                                        f"(epoch {epoch}) is kept in {work_dir}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
            n_seen += len(idx)
            bar(step + 1, {k: v / n_seen for k, v in sums.items()})
        val_acc = accuracy(predict_logits(model, x_val), y_val)
        row = {"epoch": epoch + 1, **{k: v / n_seen for k, v in sums.items()}, "val_accuracy": val_acc,
               "lr": scheduler.get_last_lr()[0]}
        if temperature is not None:
            row["temperature"] = temperature
        result.history.append(row)
        log(f"epoch {epoch + 1}/{cfg.epochs}  " + "  ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
        _save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch + 1, result.history, extra_params)
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result


def _save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, history: list[dict],
                     extra_params: list) -> None:
    import io

    keys = sorted({k for row in history for k in row})
    table = torch.tensor([[float(row.get(k, float("nan"))) for k in keys] for row in history], dtype=torch.float64)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "history": table, "history_keys": keys,
                "extra_params": [p.detach().clone() for p in extra_params]}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _progress(total: int, label: str):
    """A one-line progress bar on a terminal (silent in CI logs, where the per-epoch line is enough)."""
    if not sys.stderr.isatty():
        return lambda step, terms: None

    def update(step: int, terms: dict) -> None:
        width = 24
        done = int(width * step / total)
        text = " ".join(f"{k}={v:.3f}" for k, v in terms.items())
        sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {step}/{total} {text}   ")
        if step == total:
            sys.stderr.write("\r" + " " * (len(label) + width + len(text) + 30) + "\r")
        sys.stderr.flush()

    return update
