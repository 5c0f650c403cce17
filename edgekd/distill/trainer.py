"""The training loop, readable top to bottom: used to train a teacher (alpha = 0, no teacher) and to distil a student.

Checkpoints every epoch into `work_dir` (model, optimizer, schedule, history, RNG), so a killed run resumes from
the last finished epoch. A NaN or infinite loss stops training with a clear error; the last good checkpoint stays.

Data-parallel when the process is one rank of a torchrun group (edgekd.distributed): the model is wrapped in
DistributedDataParallel and every global batch of `batch_size` (the same permutation on every rank) is split among
the ranks, each rank's loss weighted by its share, so the averaged gradient is the single-process batch's gradient
and the schedule (steps, learning rate) is the single-process one. Only rank 0 writes checkpoints; epoch metrics are
summed over ranks. On a GPU the forward passes run under bfloat16 autocast when `amp` allows it (losses in float32).
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
from edgekd.data.augment import BatchAugment, describe
from edgekd.distributed import World, world as current_world
from edgekd.distill import batchnorm
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
    processes: int = 1  # ranks that trained it (data-parallel)
    batchnorm: Optional[dict] = None  # the BatchNorm re-estimate after training (batchnorm.summary), if any

    @property
    def val_accuracy(self) -> float:
        """The returned model's validation accuracy (with re-estimated BatchNorm statistics when they were kept)."""
        if self.batchnorm and self.batchnorm["kept"]:
            return self.batchnorm["val_accuracy_recalibrated"]
        return self.history[-1]["val_accuracy"] if self.history else float("nan")


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


PREDICT_PIXELS = 512 * 28 * 28  # pixels per prediction batch: 512 Fashion-MNIST images


def prediction_batch(shape: tuple[int, ...]) -> int:
    """Rows per prediction batch for images of `shape` (..., H, W): 512 for small images, fewer for larger ones, so a
    batch's activations take about what 512 28x28 images take (96x96: 43 rows, not 512 -> 12x less memory)."""
    return max(8, min(512, PREDICT_PIXELS // max(1, int(shape[-2]) * int(shape[-1]))))


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: Optional[int] = None,
                   rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Eval-mode logits. x: (N, C, H, W) images read as float32 by index (an ImageArray converts one batch at a
    time, or a float32 array) -> (N, K) float32 (on the model's device, returned on the CPU). `rows`: only these
    rows of x, in this order. `batch_size`: default `prediction_batch` of the image size."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    n = len(x) if rows is None else len(rows)
    bs = batch_size or prediction_batch(x.shape)
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + bs] if rows is None else x[rows[i:i + bs]]))
                 .to(device)).float().cpu().numpy()
           for i in range(0, n, bs)]
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def predict_logits_shared(model: nn.Module, x: np.ndarray, w: Optional[World] = None) -> np.ndarray:
    """predict_logits over all of x, the work split among the ranks (rank r takes rows r, r + W, ...) and the result
    gathered on every rank: the same (N, K) array a single process computes, computed once."""
    w = w or current_world()
    if not w.is_distributed:
        return predict_logits(model, x)
    parts = w.all_gather(predict_logits(model, x, rows=np.arange(w.rank, len(x), w.world_size)))
    k = next(p.shape[1] for p in parts if p.size)
    out = np.zeros((len(x), k), np.float32)
    for r, part in enumerate(parts):
        out[r::w.world_size] = part
    return out


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")


def train(model: nn.Module, cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray,
          x_val: np.ndarray, y_val: np.ndarray, *, seed: int, work_dir: Path,
          kd: Optional[KDSettings] = None, teacher_logits: Optional[np.ndarray] = None,
          teacher: Optional[nn.Module] = None, extra_loss: Optional[Callable] = None,
          extra_params: Optional[list] = None, log: Callable[[str], None] = print, stage: str = "train",
          amp: bool = True, world: Optional[World] = None) -> TrainResult:
    """Train `model` in place.

    x_train: (N, C, H, W) images read as float32 in [0, 1] by index (an ImageArray, converted a batch at a time, or
    a float32 array), y_train: (N,) int64. With `cfg.augment`, each batch is augmented (seeded from `seed` and
    the epoch) before the student and the teacher see it. With `kd`, the soft targets come from `teacher_logits`
    ((N, K), precomputed: the teacher output cache) or else from running the frozen `teacher` on each batch
    (several teachers: (N, M, K) outputs, turned into the ensemble's targets by `kd.targets`).
    `extra_loss(student_logits, batch_x, teacher_logits) -> dict of named terms` adds feature-level losses (its
    "loss" is added to the total; `teacher_logits` is the batch's teacher output as the KD term used it, None
    without `kd`); `extra_params` (e.g. its adapters) are optimized and checkpointed with the model.
    `amp`: bfloat16 autocast of the forward passes on a GPU (off for QAT: fake quantization wants float32).
    The model (and teacher, and extra params) train on the world's device and are back on the CPU on return.
    """
    w = world or current_world()
    is_main = w.is_main
    log = log if is_main else (lambda msg: None)
    # Ranks on one machine share its cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, w.local_world_size)))
    device = torch.device(w.device)
    model.to(device)
    if teacher is not None:
        teacher.eval()
        teacher.to(device)
        for p in teacher.parameters():
            p.requires_grad_(False)
    extra_params = list(extra_params or [])
    for p in extra_params:
        p.data = p.data.to(device)
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
    if ckpt_path.is_file():  # every rank reads rank 0's checkpoint (the run dir is shared)
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
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

    # DDP syncs the parameters from rank 0 when it wraps the model; adapters (extra params) are outside the module,
    # so they are broadcast here and their gradients averaged by hand below.
    net = model
    if w.is_distributed:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        for p in extra_params:
            dist.broadcast(p.data, src=0)

    y_t = torch.from_numpy(y_train)
    t_logits = torch.from_numpy(teacher_logits) if teacher_logits is not None else None
    augment = cfg.augment if cfg.augment is not None and cfg.augment.active() else None
    if augment is not None and t_logits is not None:  # cached logits belong to the un-augmented images
        raise StageError(stage, "cached teacher outputs cannot be used with augmentation: the teacher must see each "
                                "augmented batch")
    if augment is not None:
        log(f"augmenting every training batch (seeded per epoch): {describe(augment)}")
    height, width = (int(d) for d in x_train.shape[-2:])
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        # The same permutation on every rank: global batch b is order[b*B:(b+1)*B]; rank r takes rows r, r+W, ...
        order = torch.from_numpy(np.random.default_rng(seed * 1000 + epoch).permutation(len(x_train)))
        torch.manual_seed(seed * 1000 + epoch + 7919 * w.rank)  # dropout masks differ per rank
        aug = BatchAugment(augment, seed, epoch) if augment is not None else None
        sums: dict[str, float] = {}
        n_seen = 0
        temperature = None
        bar = _progress(steps_per_epoch, f"{stage} epoch {epoch + 1}/{cfg.epochs}", show=is_main)
        for step in range(steps_per_epoch):
            batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if len(batch) < w.world_size:  # a last batch too small to give every rank a row (only when W > 1)
                continue
            idx = batch[w.rank::w.world_size]
            share = w.world_size * len(idx) / len(batch)  # DDP averages over ranks; this makes it the batch mean
            # uint8 storage -> float32 in [0, 1] for this batch only
            xb = torch.from_numpy(x_train[idx.numpy()]).to(device, non_blocking=True)
            yb = y_t[idx].to(device, non_blocking=True)
            if aug is not None:  # draws for the whole global batch, every rank: its rows as one process has them
                xb = aug.apply(xb, aug.draw(len(batch), height, width)[w.rank::w.world_size])
            with _autocast(device, amp):
                logits = net(xb)
                tb = None
                if kd is not None and t_logits is None:
                    with torch.no_grad():
                        tb = teacher(xb)
            logits = logits.float()
            if kd is not None:
                progress = (epoch * steps_per_epoch + step) / max(1, total_steps - 1)
                temperature = temperature_at(progress, kd.temperature, kd.temperature_end, kd.schedule)
                tb = (t_logits[idx].to(device) if t_logits is not None else tb).float()
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
            # Decided together: one rank stopping alone would leave the others waiting in backward's all-reduce.
            finite = float(torch.isfinite(loss))
            if w.is_distributed:
                finite = w.sum([finite])[0] / w.world_size
            if finite < 1:
                value = loss.item() if not torch.isfinite(loss) else "non-finite on another rank"
                raise StageError(stage, f"loss became {value} at epoch {epoch + 1}, step {step + 1}"
                                        f"; lower the learning rate ({cfg.lr}); "
                                        f"the last good checkpoint (epoch {epoch}) is kept in {work_dir}")
            optimizer.zero_grad(set_to_none=True)
            (loss * share).backward()
            if w.is_distributed and extra_params:
                _average_gradients(extra_params, w.world_size)
            optimizer.step()
            scheduler.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
            n_seen += len(idx)
            bar(step + 1, {k: v / n_seen for k, v in sums.items()})
        if w.is_distributed:  # epoch means over all ranks' rows: what one process would have logged
            names = sorted(sums)
            totals = w.sum([sums[k] for k in names] + [float(n_seen)])
            sums, n_seen = dict(zip(names, totals[:-1])), int(totals[-1])
        if w.is_distributed:  # one model on every rank before it is evaluated (split among them) or saved
            _sync_buffers(model)
        val_acc = accuracy(predict_logits_shared(model, x_val, w), y_val)  # split among the ranks
        row = {"epoch": epoch + 1, **{k: v / max(1, n_seen) for k, v in sums.items()}, "val_accuracy": val_acc,
               "lr": scheduler.get_last_lr()[0]}
        if temperature is not None:
            row["temperature"] = temperature
        result.history.append(row)
        log(f"epoch {epoch + 1}/{cfg.epochs}  " + "  ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
        if is_main:
            _save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch + 1, result.history, extra_params)
    result.batchnorm = _recalibrate_batchnorm(model, cfg, x_train, x_val, y_val, result.history, seed, w, log)
    result.seconds = time.perf_counter() - t0
    result.processes = w.world_size
    model.eval()  # (an exported QAT model's eval() returns None: no chaining)
    model.to("cpu")
    if teacher is not None:
        teacher.to("cpu")
    for p in extra_params:
        p.data = p.data.to("cpu")
    return result


def _recalibrate_batchnorm(model: nn.Module, cfg: TrainConfig, x_train: np.ndarray, x_val: np.ndarray,
                           y_val: np.ndarray, history: list[dict], seed: int, w: World,
                           log: Callable[[str], None]) -> Optional[dict]:
    """`cfg.recalibrate_batchnorm`: re-estimate the BatchNorm statistics on training images (see edgekd.distill.
    batchnorm for why); 'auto' keeps them only if they score higher on the validation split than the running
    statistics training left, 'always' keeps them. None when there is nothing to do (no BatchNorm layer, 'never', or
    a QAT program, whose BatchNorm is inside the exported graph)."""
    policy = cfg.recalibrate_batchnorm
    if policy == "never" or not history or not batchnorm.batchnorm_layers(model):
        return None
    if policy == "auto" and len(y_val) == 0:
        log("BatchNorm statistics not re-estimated: recalibrate_batchnorm 'auto' compares on the validation split, "
            "which is empty")
        return None
    before = history[-1]["val_accuracy"]
    saved = batchnorm.statistics(model)
    images = batchnorm.recalibrate(model, x_train, cfg.batch_size, seed=seed, rank=w.rank, world_size=w.world_size)
    if w.is_distributed:  # each rank averaged over its rows: the mean of the ranks' statistics, on every rank
        _sync_buffers(model)
        images = int(w.sum([float(images)])[0])
    after = accuracy(predict_logits_shared(model, x_val, w), y_val)
    kept = policy == "always" or after > before
    if not kept:
        batchnorm.restore(model, saved)
    info = batchnorm.summary(images, before, after, kept, policy)
    log(batchnorm.describe(info))
    return info


def _sync_buffers(model: nn.Module) -> None:
    """Make every rank's buffers rank-independent. DDP broadcasts rank 0's buffers before each forward, but each
    rank's BatchNorm then updates its running statistics from its own part of the batch (SyncBatchNorm needs a GPU),
    so after the last step the ranks hold different models. BatchNorm statistics are averaged over the ranks (every
    rank's rows count, as in one process); any other buffer (QAT observers, counters) is taken from rank 0."""
    import torch.distributed as dist

    size = dist.get_world_size()
    averaged = set()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for b in (module.running_mean, module.running_var):
                if b is not None:
                    dist.all_reduce(b.data)
                    b.data /= size
                    averaged.add(id(b))
    for b in model.buffers():
        if id(b) not in averaged:
            dist.broadcast(b.data, src=0)


def _average_gradients(params: list, world_size: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size


def _autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on a GPU that supports it (no loss scaling needed); nothing on the CPU."""
    import contextlib

    if amp and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def _progress(total: int, label: str, show: bool = True):
    """A one-line progress bar on a terminal (silent in CI logs, where the per-epoch line is enough, and on every
    rank but 0)."""
    if not (show and sys.stderr.isatty()):
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
