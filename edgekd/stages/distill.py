"""distill: train the student from the frozen teacher's soft targets (KD) plus label cross-entropy."""

import numpy as np

from edgekd.distill.trainer import KDSettings, accuracy, predict_logits, train
from edgekd.models.zoo import count_params, model_from_config
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.stages.common import load_splits, load_teacher, save_state_dict


class DistillStage(Stage):
    name = "distill"
    deps = ("data", "teacher")
    description = "distil the student from the teacher"

    def config(self, cfg):
        return {"student": cfg.section("student"), "distill": cfg.section("distill"), "seed": cfg.seed}

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.cfg.distill
        splits = load_splits(ctx)
        teacher = load_teacher(ctx, splits)
        student = model_from_config(ctx.cfg.student, splits.input_shape, splits.num_classes)
        teacher_logits = None
        if cfg.cache_teacher_outputs:
            teacher_logits = np.load(ctx.input_path("teacher", "train_logits.npy"))
        ctx.log(f"student {ctx.cfg.student.arch}: {count_params(student):,} params "
                f"(teacher {count_params(teacher):,}); alpha={cfg.alpha}, T={cfg.temperature}"
                + (f"->{cfg.temperature_end} ({cfg.temperature_schedule})" if cfg.temperature_schedule != "constant"
                   else "") + f", teacher outputs {'cached' if teacher_logits is not None else 'computed per batch'}")
        result = train(student, cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                       seed=ctx.cfg.seed, work_dir=ctx.work_dir, log=ctx.log, stage="distill",
                       kd=KDSettings(cfg.alpha, cfg.temperature, cfg.temperature_schedule, cfg.temperature_end),
                       teacher_logits=teacher_logits, teacher=teacher)
        save_state_dict(student, ctx.out_dir / "student.pt")
        test_acc = accuracy(predict_logits(student, splits.x_test), splits.y_test)
        ctx.log(f"student val accuracy {result.val_accuracy:.4f}, test accuracy (torch) {test_acc:.4f}")
        return {"arch": ctx.cfg.student.arch, "params": count_params(student), "val_accuracy": result.val_accuracy,
                "test_accuracy_torch": test_acc, "history": result.history,
                "resumed_from_epoch": result.resumed_from_epoch, "train_seconds": result.seconds,
                "teacher_output_cache": teacher_logits is not None}
