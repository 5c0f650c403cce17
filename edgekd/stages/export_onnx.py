"""export_onnx: student (and teacher, as the latency reference) to single-file ONNX, parity-checked vs PyTorch;
the class names (labels.txt, one per line in output-index order) copied next to them."""

import shutil

from edgekd.errors import StageError
from edgekd.export.onnx_export import export_onnx, parity
from edgekd.models.sources import is_torch_exportable, write_onnx_teacher
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.stages.common import load_splits, load_student, load_teacher, sample


class ExportOnnxStage(Stage):
    name = "export_onnx"
    deps = ("data", "teacher", "distill")
    optional_deps = ("prune",)  # the pruned student, when pruning is on
    description = "export to ONNX fp32 and check parity"

    def config(self, cfg):
        return {"export": cfg.section("export"), "seed": cfg.seed}

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.cfg.export
        splits = load_splits(ctx)
        x = sample(splits.x_val, cfg.parity_samples, ctx.cfg.seed)
        results = {}
        for role, model in (("student", load_student(ctx, splits)), ("teacher", load_teacher(ctx, splits))):
            path = ctx.out_dir / f"{role}_fp32.onnx"
            # an ONNX teacher is already ONNX: its own graph (plus the pipeline's normalization) is the reference
            info = (export_onnx(model, x, path, opset=cfg.opset, stage=self.name) if is_torch_exportable(model)
                    else write_onnx_teacher(model, path))
            check = parity(model, path, x)
            ctx.log(f"{path.name}: {info['nodes']} nodes, parity vs torch: max |diff| {check['max_abs_diff']:.2e}, "
                    f"top-1 agreement {check['top1_agreement']:.4f} on {check['samples']} validation images")
            if check["max_abs_diff"] > cfg.parity_max_abs_diff:
                raise StageError(self.name, f"{path.name} disagrees with PyTorch: max |diff| "
                                            f"{check['max_abs_diff']:.3g} > {cfg.parity_max_abs_diff}")
            results[role] = {**info, "parity": check}
        if ctx.has_input("data", "labels.txt"):  # class names in output-index order, next to the model files
            shutil.copyfile(ctx.input_path("data", "labels.txt"), ctx.out_dir / "labels.txt")
        return {"student": results["student"], "teacher": results["teacher"],
                "artifacts": [{"name": "student_fp32.onnx", "file": "student_fp32.onnx", "format": "onnx",
                               "precision": "fp32"}],
                "reference": {"name": "teacher_fp32.onnx", "file": "teacher_fp32.onnx"}}
