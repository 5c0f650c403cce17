"""teacher: load the user's teacher(s) (state dicts, weights_only) or train them here; cache their training logits.

With `teachers:` (several), each is loaded or trained in turn; the stage reports each one's accuracy and the
ensemble's own (weighted mean of the members' probabilities).
"""

from pathlib import Path

import numpy as np
import torch

from edgekd.distill.losses.ensemble import ensemble_logits
from edgekd.distill.teachers import input_shape_for, with_input_size
from edgekd.distill.trainer import accuracy, predict_logits_shared, train
from edgekd.errors import DataError, StageError
from edgekd.models.checkpoint import load_into, load_state_dict
from edgekd.models.sources import label, source_digest, source_of
from edgekd.models.zoo import count_params, model_from_config
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.pipeline.store import sha256_file
from edgekd.stages.common import load_splits, save_state_dict, teacher_file


class TeacherStage(Stage):
    name = "teacher"
    distributed = True  # trains: every rank of a distributed build takes part
    deps = ("data",)
    description = "load or train the teacher(s)"

    def config(self, cfg):
        if cfg.teachers is not None:
            return {"teachers": cfg.section("teachers"), "seed": cfg.seed}
        return {"teacher": cfg.section("teacher"), "seed": cfg.seed}

    def extra_key(self, cfg, target):
        digests = [sha256_file(Path(t.checkpoint)) if t.checkpoint and Path(t.checkpoint).is_file() else None
                   for t in cfg.teacher_list()]
        # the model's code or saved file (user file, module, library version, .pt2 / .onnx)
        sources = [source_digest(t) for t in cfg.teacher_list()]
        if cfg.teachers is not None:
            return {"checkpoint_digests": digests, "source_digests": sources}
        return {"checkpoint_digest": digests[0], "source_digest": sources[0]}

    def run(self, ctx: StageContext) -> dict:
        splits = load_splits(ctx)
        teachers, names = ctx.cfg.teacher_list(), ctx.cfg.teacher_names()
        several = len(teachers) > 1
        members, logits = [], {"train": [], "val": [], "test": []}
        for i, (tcfg, name, key) in enumerate(zip(teachers, names, ctx.cfg.teacher_keys())):
            work_dir = ctx.work_dir / f"teacher_{i}" if several else ctx.work_dir
            work_dir.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(ctx.cfg.seed + i)  # reproducible initial weights (each teacher its own)
            model, history = _load_or_train(ctx, splits, tcfg, key, work_dir)
            _check_finite_weights(model, key, tcfg.checkpoint)
            adapted = with_input_size(model, tcfg.input_size)
            # Teacher output cache: inputs are not augmented, so the soft targets are the same every epoch. Computed
            # once, split among the ranks of a distributed build.
            for split in logits:
                logits[split].append(predict_logits_shared(adapted, getattr(splits, f"x_{split}")))
                _check_finite_outputs(logits[split][-1], key, split)
            # written only once the teacher proved finite: a bad teacher leaves nothing behind
            save_state_dict(model, ctx.out_dir / teacher_file(i, len(teachers)))
            val_acc = accuracy(logits["val"][-1], splits.y_val)
            test_acc = accuracy(logits["test"][-1], splits.y_test)
            what = f"teacher {name} ({label(tcfg)})" if several else f"teacher {label(tcfg)}"
            ctx.log(f"{what}: {count_params(model):,} params, val accuracy {val_acc:.4f}, "
                    f"test accuracy (torch) {test_acc:.4f}"
                    + (f"; input resized to {tcfg.input_size}" if tcfg.input_size else ""))
            members.append({"name": name, "arch": label(tcfg), "params": count_params(model),
                            "source": source_of(tcfg).kind,
                            "trained_here": tcfg.train is not None and tcfg.checkpoint is None,
                            "checkpoint": tcfg.checkpoint or tcfg.exported or tcfg.onnx,  # the file it came from
                            "input_size": tcfg.input_size, "weight": tcfg.weight, "val_accuracy": val_acc,
                            "test_accuracy_torch": test_acc, "history": history})
        if not several:
            np.save(ctx.out_dir / "train_logits.npy", logits["train"][0])
            return {k: members[0][k] for k in ("arch", "source", "params", "trained_here", "checkpoint", "val_accuracy",
                                               "test_accuracy_torch", "history", "input_size")}
        # Several teachers: each one's logits (for soft targets averaged at the distillation temperature) and the
        # ensemble's own (log of its weighted mean probabilities), for consumers that want one (N, K) target.
        weights = [t.weight for t in teachers]
        member_train = np.stack(logits["train"], axis=1)
        np.save(ctx.out_dir / "train_member_logits.npy", member_train)
        np.save(ctx.out_dir / "train_logits.npy", _ensemble(member_train, weights))
        val_acc = accuracy(_ensemble(np.stack(logits["val"], axis=1), weights), splits.y_val)
        test_acc = accuracy(_ensemble(np.stack(logits["test"], axis=1), weights), splits.y_test)
        ctx.log(f"ensemble of {len(teachers)} teachers (weights {weights}): val accuracy {val_acc:.4f}, "
                f"test accuracy (torch) {test_acc:.4f}")
        return {"arch": "ensemble", "params": sum(m["params"] for m in members),
                "trained_here": all(m["trained_here"] for m in members), "checkpoint": None,
                "val_accuracy": val_acc, "test_accuracy_torch": test_acc, "history": [],
                "members": members, "ensemble": {"weights": weights, "val_accuracy": val_acc,
                                                 "test_accuracy_torch": test_acc}}


def _load_or_train(ctx: StageContext, splits, tcfg, key: str, work_dir: Path):
    """One teacher's model (built for its own input size) from its checkpoint, or trained here; and its history."""
    model = model_from_config(tcfg, input_shape_for(splits.input_shape, tcfg.input_size), splits.num_classes)
    if tcfg.exported or tcfg.onnx:  # a saved teacher: its weights came with it
        ctx.log(f"{key}: loaded {label(tcfg)}")
        return model.eval(), []
    if tcfg.checkpoint:
        state = load_state_dict(tcfg.checkpoint, allow_pickle=tcfg.allow_pickle)
        _check_classes(state, splits.num_classes, tcfg.checkpoint)
        load_into(model, state, tcfg.checkpoint, tcfg.arch)
        ctx.log(f"{key}: loaded {tcfg.arch} from {tcfg.checkpoint}")
        return model.eval(), []
    result = train(with_input_size(model, tcfg.input_size), tcfg.train, splits.x_train, splits.y_train,
                   splits.x_val, splits.y_val, seed=ctx.cfg.seed, work_dir=work_dir, log=ctx.log, stage=key)
    return model.eval(), result.history


def _check_finite_weights(model: torch.nn.Module, key: str, checkpoint: str | None) -> None:
    """A teacher with NaN or infinite weights would poison every soft target: refused before anything is written."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            source = f"checkpoint {checkpoint}" if checkpoint else "the trained model"
            raise StageError("teacher", f"{key}: {source} has NaN or infinite values in {name}; "
                                        f"a teacher's weights must be finite")


def _check_finite_outputs(logits: np.ndarray, key: str, split: str) -> None:
    """Finite weights can still overflow to inf/NaN outputs (huge weights): the soft targets must be finite too."""
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).any(axis=1).sum())
        raise StageError("teacher", f"{key}: its outputs are NaN or infinite on {bad} of {len(logits)} {split} "
                                    f"images; a teacher's outputs must be finite")


def _ensemble(member_logits: np.ndarray, weights: list[float]) -> np.ndarray:
    return ensemble_logits(torch.from_numpy(member_logits), weights, 1.0).numpy()


def _check_classes(state: dict, num_classes: int, path: str) -> None:
    """A teacher whose classifier has another number of outputs than the dataset has classes is refused early."""
    weights = [(k, v) for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if weights:
        key, w = weights[-1]
        if w.shape[0] != num_classes:
            raise DataError(f"{path}: the teacher outputs {w.shape[0]} classes ({key}) but the dataset has "
                            f"{num_classes}")
