"""teacher: load the user's teacher (a state dict, weights_only) or train one here; cache its training logits."""

import numpy as np

from edgekd.distill.trainer import accuracy, predict_logits, train
from edgekd.errors import DataError
from edgekd.models.checkpoint import load_into, load_state_dict
from edgekd.models.zoo import count_params, model_from_config
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.pipeline.store import sha256_file
from edgekd.stages.common import load_splits, save_state_dict


class TeacherStage(Stage):
    name = "teacher"
    deps = ("data",)
    description = "load or train the teacher"

    def config(self, cfg):
        return {"teacher": cfg.section("teacher"), "seed": cfg.seed}

    def extra_key(self, cfg):
        ckpt = cfg.teacher.checkpoint
        from pathlib import Path

        return {"checkpoint_digest": sha256_file(Path(ckpt)) if ckpt and Path(ckpt).is_file() else None}

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.cfg.teacher
        splits = load_splits(ctx)
        model = model_from_config(cfg, splits.input_shape, splits.num_classes)
        history: list = []
        if cfg.checkpoint:
            state = load_state_dict(cfg.checkpoint, allow_pickle=cfg.allow_pickle)
            _check_classes(state, splits.num_classes, cfg.checkpoint)
            load_into(model, state, cfg.checkpoint, cfg.arch)
            ctx.log(f"loaded {cfg.arch} from {cfg.checkpoint}")
        else:
            result = train(model, cfg.train, splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                           seed=ctx.cfg.seed, work_dir=ctx.work_dir, log=ctx.log, stage="teacher")
            history = result.history
        model.eval()
        save_state_dict(model, ctx.out_dir / "teacher.pt")
        # Teacher output cache: inputs are not augmented, so the soft targets are the same every epoch.
        train_logits = predict_logits(model, splits.x_train)
        np.save(ctx.out_dir / "train_logits.npy", train_logits)
        val_acc = accuracy(predict_logits(model, splits.x_val), splits.y_val)
        test_acc = accuracy(predict_logits(model, splits.x_test), splits.y_test)
        ctx.log(f"teacher {cfg.arch}: {count_params(model):,} params, val accuracy {val_acc:.4f}, "
                f"test accuracy (torch) {test_acc:.4f}")
        return {"arch": cfg.arch, "params": count_params(model), "trained_here": cfg.checkpoint is None,
                "checkpoint": cfg.checkpoint, "val_accuracy": val_acc, "test_accuracy_torch": test_acc,
                "history": history}


def _check_classes(state: dict, num_classes: int, path: str) -> None:
    """A teacher whose classifier has another number of outputs than the dataset has classes is refused early."""
    weights = [(k, v) for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if weights:
        key, w = weights[-1]
        if w.shape[0] != num_classes:
            raise DataError(f"{path}: the teacher outputs {w.shape[0]} classes ({key}) but the dataset has "
                            f"{num_classes}")
