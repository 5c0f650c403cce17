"""assistant: the middle of a teacher -> assistant -> student chain (Mirzadeh et al., 2020, "Improved Knowledge
Distillation via Teacher Assistant"). A mid-size model is distilled from the teacher with the same methods and
training loop as the student; the distill stage then uses it as the student's teacher. Disabled (skipped)
unless the pipeline has an `assistant:` section; cached like any stage."""

import numpy as np
import torch

from edgekd.config import to_plain
from edgekd.distill.run import distill_model
from edgekd.distill.trainer import accuracy, predict_logits
from edgekd.distributed import world
from edgekd.models.sources import source_digest
from edgekd.models.zoo import count_params, model_from_config
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.stages.common import batch_teacher, load_splits, save_state_dict


class AssistantStage(Stage):
    name = "assistant"
    distributed = True  # trains: every rank of a distributed build takes part
    deps = ("data", "teacher")
    description = "distil the teacher assistant from the teacher"

    def config(self, cfg):
        if cfg.assistant is None:
            return None
        return {"assistant": cfg.section("assistant"), "distill": to_plain(cfg.assistant.distill or cfg.distill),
                "seed": cfg.seed}

    def extra_key(self, cfg, target):
        return {"source_digest": source_digest(cfg.assistant)} if cfg.assistant is not None else {}

    def run(self, ctx: StageContext) -> dict:
        acfg = ctx.cfg.assistant
        dcfg = acfg.distill or ctx.cfg.distill
        splits = load_splits(ctx)
        torch.manual_seed(ctx.cfg.seed)  # reproducible initial weights
        model = model_from_config(acfg, splits.input_shape, splits.num_classes)
        teacher, cache_file, weights = batch_teacher(ctx, splits)
        ctx.log(f"assistant {acfg.arch}: {count_params(model):,} params, from the teacher "
                f"({count_params(teacher):,} params)")
        run = distill_model(model, dcfg, splits, teacher, cache_file, weights, seed=ctx.cfg.seed,
                            work_dir=ctx.work_dir, log=ctx.log, stage="assistant")
        if not world().is_main:  # a distributed build: rank 0 alone scores and writes the assistant
            return {}
        save_state_dict(model, ctx.out_dir / "assistant.pt")
        # The assistant's own output cache, for the student's distillation (same data, no augmentation).
        np.save(ctx.out_dir / "train_logits.npy", predict_logits(model, splits.x_train))
        test_acc = accuracy(predict_logits(model, splits.x_test), splits.y_test)
        ctx.log(f"assistant val accuracy {run.result.val_accuracy:.4f}, test accuracy (torch) {test_acc:.4f}")
        return {"arch": acfg.arch, "params": count_params(model), "val_accuracy": run.result.val_accuracy,
                "test_accuracy_torch": test_acc, "history": run.result.history,
                "teacher_output_cache": run.teacher_output_cache, "methods": run.methods}
