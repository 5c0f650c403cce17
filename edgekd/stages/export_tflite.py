"""export_tflite: TFLite fp32 of the student, through the routes `tflite.converter` names (auto's order:
tflite_routes.route_order); a route's file counts only when it loads in LiteRT without TensorFlow and matches the
ONNX model. The onnx2tf route also keeps its SavedModel for quantize_tflite, so an int8 failure never costs the
fp32 model."""

import shutil

from edgekd.errors import StageError
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.stages.common import load_splits, load_student
from edgekd.stages.tflite_routes import check_fp32, describe_file, failure_line, route_order


class ExportTFLiteStage(Stage):
    name = "export_tflite"
    deps = ("data", "teacher", "distill", "export_onnx")
    optional_deps = ("prune",)  # the pruned student, when pruning is on
    description = "convert to TFLite fp32, check parity"

    def config(self, cfg):
        if not cfg.tflite.enabled:
            return None
        int8_only = ("int8", "calibration_samples", "int8_min_agreement", "int8_activations")
        return {"tflite": {k: v for k, v in cfg.section("tflite").items() if k not in int8_only}, "seed": cfg.seed}

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.cfg.tflite
        splits = load_splits(ctx)
        out = ctx.out_dir / "student_fp32.tflite"
        tried = []
        order = route_order(cfg.converter, ctx.cfg.student)
        ctx.log(f"tflite.converter {cfg.converter}: {' then '.join(order)}")
        for route in order:
            try:
                info = self._convert(route, ctx, splits, out)
                parity = check_fp32(ctx, out, splits, self.name)
            except StageError as exc:
                tried.append({"converter": route, "error": exc.message})
                ctx.log(f"student_fp32.tflite: {route} route failed: {exc.message}")
                out.unlink(missing_ok=True)
                shutil.rmtree(ctx.out_dir / "saved_model", ignore_errors=True)
                continue
            tried.append({"converter": route, "ok": True})
            return {"fp32_parity": parity, "converter": info, "routes_tried": tried,
                    "artifacts": [{"name": out.name, "file": out.name, "format": "tflite", "precision": "fp32",
                                   "converter": {**info, "routes_tried": tried, **describe_file(out)}}]}
        raise StageError(self.name, failure_line(out.name, tried))

    def _convert(self, route: str, ctx: StageContext, splits, out) -> dict:
        """One route's fp32 file at `out`; returns what made it {"converter", "versions", "seconds", ...}."""
        if route == "litert-torch":
            from edgekd.export.litert import convert_with_litert_torch

            info = convert_with_litert_torch(load_student(ctx, splits), splits.input_shape, out, "fp32",
                                             stage=self.name, log=ctx.log)
        else:
            import time

            from edgekd.export.tflite import convert_onnx_to_tflite, onnx2tf_versions

            t0 = time.perf_counter()
            saved = ctx.out_dir / "saved_model"
            shutil.rmtree(saved, ignore_errors=True)
            convert_onnx_to_tflite(ctx.input_path("export_onnx", "student_fp32.onnx"), ctx.out_dir, None,
                                   log=ctx.log, saved_model_out=saved)
            info = {"converter": "onnx2tf", "versions": onnx2tf_versions(),
                    "seconds": round(time.perf_counter() - t0, 2), "static_batch": None}
        return info
