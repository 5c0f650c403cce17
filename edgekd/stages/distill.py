"""distill: train the student from the frozen teacher(s) with the pipeline's methods (logit KD, feature KD,
attention transfer, RKD) plus label cross-entropy; from the assistant instead when the pipeline has one."""

import torch

from edgekd.distill.run import distill_model
from edgekd.distill.teachers import BatchTeacher
from edgekd.distill.trainer import accuracy, predict_logits
from edgekd.distributed import world
from edgekd.errors import StageError
from edgekd.models.sources import label, source_digest
from edgekd.models.zoo import count_params, model_from_config
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.stages.common import batch_teacher, load_splits, save_state_dict


class DistillStage(Stage):
    name = "distill"
    distributed = True  # trains: every rank of a distributed build takes part
    deps = ("data", "teacher")
    optional_deps = ("assistant",)
    description = "distil the student from the teacher"

    def config(self, cfg):
        return {"student": cfg.section("student"), "distill": cfg.section("distill"), "seed": cfg.seed}

    def extra_key(self, cfg, target):
        return {"source_digest": source_digest(cfg.student)}  # the student's own code, when it is the user's

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.cfg.distill
        splits = load_splits(ctx)
        torch.manual_seed(ctx.cfg.seed)  # the pipeline's seed fixes the student's initial weights: reproducible builds
        student = model_from_config(ctx.cfg.student, splits.input_shape, splits.num_classes)
        if ctx.cfg.assistant is not None:
            teacher, weights = _assistant(ctx, splits), [1.0]
            cache_file = ctx.input_path("assistant", "train_logits.npy")
            source = f"assistant {ctx.cfg.assistant.arch}"
        else:
            teacher, cache_file, weights = batch_teacher(ctx, splits)
            source = f"{len(weights)} teachers" if len(weights) > 1 else f"teacher {label(ctx.cfg.teacher)}"
        ctx.log(f"student {ctx.cfg.student.arch}: {count_params(student):,} params, from the {source} "
                f"({count_params(teacher):,} params); T={cfg.temperature}"
                + (f"->{cfg.temperature_end} ({cfg.temperature_schedule})" if cfg.temperature_schedule != "constant"
                   else ""))
        run = distill_model(student, cfg, splits, teacher, cache_file, weights, seed=ctx.cfg.seed,
                            work_dir=ctx.work_dir, log=ctx.log, stage="distill")
        if not world().is_main:  # a distributed build: rank 0 alone scores and writes the student
            return {}
        save_state_dict(student, ctx.out_dir / "student.pt")
        test_acc = accuracy(predict_logits(student, splits.x_test), splits.y_test)
        ctx.log(f"student val accuracy {run.result.val_accuracy:.4f}, test accuracy (torch) {test_acc:.4f}")
        return {"arch": ctx.cfg.student.arch, "params": count_params(student), "val_accuracy": run.result.val_accuracy,
                "test_accuracy_torch": test_acc, "history": run.result.history,
                "resumed_from_epoch": run.result.resumed_from_epoch, "train_seconds": run.result.seconds,
                "train_processes": run.result.processes, "batchnorm_recalibration": run.result.batchnorm,
                "teacher_output_cache": run.teacher_output_cache, "teacher_output_cache_note": run.cache_note,
                "methods": run.methods, "distilled_from": "assistant" if ctx.cfg.assistant is not None else "teacher"}


def _assistant(ctx: StageContext, splits) -> BatchTeacher:
    """The assistant the assistant stage trained, as the student's (single) teacher."""
    if not ctx.has_input("assistant"):
        raise StageError("distill", "the pipeline has an assistant but the assistant stage did not finish; "
                                    "fix it first (the student is not silently distilled from the teacher instead)")
    model = model_from_config(ctx.cfg.assistant, splits.input_shape, splits.num_classes)
    model.load_state_dict(torch.load(ctx.input_path("assistant", "assistant.pt"), weights_only=True))
    return BatchTeacher([model.eval()], [None], ["assistant"])
