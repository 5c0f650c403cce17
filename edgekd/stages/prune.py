"""prune: structured channel pruning of the distilled student, then distillation from the teacher to recover."""

import json

import numpy as np
import torch

from edgekd.compress.pruning import (count_macs_params, first_difference, layer_shapes, load_pruned,
                                     protected_layers, prune_channels, ratio_for_macs, summary_of_layers)
from edgekd.distill.run import distill_model
from edgekd.distill.trainer import accuracy, predict_logits
from edgekd.distributed import world
from edgekd.errors import StageError, first_line
from edgekd.models.zoo import model_from_config
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.stages.common import batch_teacher, load_splits, load_student, save_state_dict


class PruneStage(Stage):
    name = "prune"
    distributed = True  # trains: every rank of a distributed build takes part
    deps = ("data", "teacher", "distill")
    description = "structured channel pruning + KD recovery"

    def config(self, cfg):
        if not cfg.prune.enabled:
            return None
        return {"prune": cfg.section("prune"), "seed": cfg.seed}

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.cfg.prune
        rec = cfg.recovery
        splits = load_splits(ctx)
        student = load_student(ctx, splits)
        example = torch.from_numpy(splits.x_train[:2])

        def test_acc(model):
            return accuracy(predict_logits(model, splits.x_test), splits.y_test)

        macs0, params0 = count_macs_params(student, example)
        shapes0 = layer_shapes(student)
        acc0 = test_acc(student)
        ratio = cfg.ratio
        if cfg.target_macs is not None:
            ratio = ratio_for_macs(student, example, cfg.target_macs, cfg.importance, cfg.global_pruning,
                                   layer_ratios=cfg.layer_ratios, round_to=cfg.round_to)
            ctx.log(f"target {cfg.target_macs:,} MACs (from {macs0:,}) -> pruning ratio {ratio:.3f}")
        kept = protected_layers(student)
        blocks = sorted({why for why in kept.values() if why != "classifier"})
        if blocks:
            ctx.log(f"kept whole (heads, head size and embedding width): {len(blocks)} "
                    f"{'attention block' if len(blocks) == 1 else 'attention blocks'}, e.g. {blocks[0]}")
        prune_channels(student, example, ratio, cfg.importance, cfg.global_pruning, cfg.layer_ratios, cfg.round_to)
        macs1, params1 = count_macs_params(student, example)
        shapes1 = layer_shapes(student)
        acc_pruned = test_acc(student)
        changed = summary_of_layers(shapes0, shapes1)
        ctx.log(f"pruned {ratio:.3f} of the channels ({cfg.importance} group magnitude"
                f"{', global' if cfg.global_pruning else ''}"
                f"{f'; per-layer {cfg.layer_ratios}' if cfg.layer_ratios else ''}"
                f"{f'; kept channels rounded to multiples of {cfg.round_to}' if cfg.round_to else ''}; "
                f"classifier kept): params {params0:,} -> {params1:,} "
                f"({params1 / params0:.1%}), MACs {macs0:,} -> {macs1:,} ({macs1 / macs0:.1%}); test accuracy "
                f"{acc0:.4f} -> {acc_pruned:.4f} before recovery")
        for layer, what in changed.items():
            ctx.log(f"  {layer}: {what}")

        teacher, cache_file, weights = batch_teacher(ctx, splits)
        result = distill_model(student, rec, splits, teacher, cache_file, weights, seed=ctx.cfg.seed,
                               work_dir=ctx.work_dir, log=ctx.log, stage="prune").result
        if not world().is_main:  # a distributed build: rank 0 alone scores and writes the pruned student
            return {}
        acc1 = test_acc(student)
        ctx.log(f"after {rec.epochs} epochs of KD recovery: test accuracy {acc1:.4f} (unpruned {acc0:.4f}, "
                f"{(acc1 - acc0) * 100:+.2f} points)")

        save_state_dict(student, ctx.out_dir / "student.pt")
        (ctx.out_dir / "student_shapes.json").write_text(json.dumps(shapes1, indent=1, sort_keys=True))
        # What downstream stages will do: rebuild from the config + shapes, load the weights, get the same model.
        fresh = model_from_config(ctx.cfg.student, splits.input_shape, splits.num_classes)
        try:
            reloaded = load_pruned(fresh, shapes1, ctx.out_dir / "student.pt")
        except (ValueError, RuntimeError) as exc:
            raise StageError(self.name, f"the pruned student cannot be rebuilt from its layer shapes: "
                                        f"{first_line(exc)}") from None
        x = splits.x_val[:64]
        ref, got = predict_logits(student, x), predict_logits(reloaded, x)
        if np.abs(ref - got).max() > 1e-4 * max(1.0, float(np.abs(ref).max())):
            where = first_difference(student, reloaded, torch.from_numpy(np.ascontiguousarray(x[:8])))
            raise StageError(self.name, f"the pruned student does not reload to the same model from its state dict "
                                        f"and layer shapes (first layer that differs: {where or 'none found'}); "
                                        f"rebuild does not cover that layer's shape")
        return {"method": "structured channel pruning (torch-pruning, group magnitude)", "ratio": ratio,
                "target_macs": cfg.target_macs, "importance": cfg.importance, "global_pruning": cfg.global_pruning,
                "layer_ratios": dict(cfg.layer_ratios), "round_to": cfg.round_to,
                "params_before": params0, "params_after": params1, "params_ratio": params1 / params0,
                "macs_before": macs0, "macs_after": macs1, "macs_ratio": macs1 / macs0,
                "test_accuracy_before": acc0, "test_accuracy_after_pruning": acc_pruned,
                "test_accuracy_after_recovery": acc1, "val_accuracy_after_recovery": result.val_accuracy,
                "recovery": {"epochs": rec.epochs, "alpha": rec.alpha, "temperature": rec.temperature,
                             "history": result.history, "resumed_from_epoch": result.resumed_from_epoch,
                             "train_seconds": result.seconds},
                "layers": changed, "protected_layers": len(kept),
                "attention_blocks_kept": blocks}
