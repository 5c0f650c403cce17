"""quantize_tflite: int8 TFLite through the routes `tflite.converter` names (litert-torch's PT2E quantizer, TF's
converter on onnx2tf's SavedModel; auto's order: tflite_routes.route_order), calibrated on training images. Full
integer (static activations; onnx2tf's files take int8 input, litert-torch's take float input that their first op
quantizes; both give int8 output) from every route first; under
`tflite.int8_activations: auto` litert-torch's dynamic activations (int8 weights, activations quantized at run time)
only when no static file agrees, and the report says which. A file counts only when it loads in LiteRT without
TensorFlow and agrees with the float ONNX model.
A stage of its own, so its failure leaves the fp32 TFLite built, evaluated and benchmarked; it does not need the
fp32 TFLite either (litert-torch converts the PyTorch student), so it runs when export_tflite failed."""

import shutil
import tempfile
import time
from pathlib import Path

from edgekd.errors import StageError
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.stages.common import load_splits, load_student, sample
from edgekd.stages.tflite_routes import check_int8, describe_file, failure_line, route_order


class QuantizeTFLiteStage(Stage):
    name = "quantize_tflite"
    deps = ("data", "teacher", "distill", "export_onnx")
    optional_deps = ("prune", "export_tflite")  # export_tflite: onnx2tf's SavedModel, when its route made the fp32
    description = "int8 TFLite, check agreement"

    def config(self, cfg):
        if not (cfg.tflite.enabled and cfg.tflite.int8):
            return None
        return {"tflite": cfg.section("tflite"), "seed": cfg.seed}

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.cfg.tflite
        splits = load_splits(ctx)
        calib = sample(splits.x_train, cfg.calibration_samples, ctx.cfg.seed + 1)
        out = ctx.out_dir / "student_int8.tflite"
        tried = []
        attempts = int8_attempts(route_order(cfg.converter, ctx.cfg.student), cfg.int8_activations)
        ctx.log(f"tflite.converter {cfg.converter}, int8_activations {cfg.int8_activations}: "
                + " then ".join(f"{route} ({act})" for route, act in attempts))
        for route, activations in attempts:
            try:
                if route == "onnx2tf" and activations == "dynamic":
                    raise StageError(self.name, "makes full-integer int8 only (tflite.int8_activations: dynamic "
                                                "needs litert-torch)")
                info = self._convert(route, ctx, splits, calib, out, activations)
                parity = check_int8(ctx, out, splits, self.name)
            except StageError as exc:
                tried.append({"converter": route, "activations": activations, "error": exc.message})
                ctx.log(f"student_int8.tflite: {route} route ({activations} activations) failed: {exc.message}")
                out.unlink(missing_ok=True)
                continue
            tried.append({"converter": route, "activations": activations, "ok": True})
            if activations == "dynamic":
                ctx.log("student_int8.tflite: int8 weights with dynamic activations (float input and output; "
                        "runs on CPU/XNNPACK, not on int8-only accelerators)")
            return {"int8_parity": parity, "calibration_samples": int(len(calib)), "converter": info,
                    "routes_tried": tried,
                    "artifacts": [{"name": out.name, "file": out.name, "format": "tflite", "precision": "int8",
                                   "converter": {**info, "routes_tried": tried, **describe_file(out)}}]}
        raise StageError(self.name, failure_line(out.name, tried))

    def _convert(self, route: str, ctx: StageContext, splits, calib, out: Path, activations: str) -> dict:
        if route == "litert-torch":
            from edgekd.export.litert import convert_with_litert_torch

            return convert_with_litert_torch(load_student(ctx, splits), splits.input_shape, out, "int8", calib,
                                             stage=self.name, log=ctx.log, activations=activations)
        from edgekd.export.tflite import convert_onnx_to_tflite, onnx2tf_versions, quantize_saved_model_int8

        t0 = time.perf_counter()
        if ctx.has_input("export_tflite", "saved_model/saved_model.pb"):  # onnx2tf made the fp32: reuse its graph
            saved_model = ctx.input_path("export_tflite", "saved_model/saved_model.pb").parent
            quantize_saved_model_int8(saved_model, calib, out, stage=self.name)
        else:  # the fp32 came from litert-torch (or failed): onnx2tf converts here, its fp32 file is dropped
            with tempfile.TemporaryDirectory(prefix="edgekd_onnx2tf_") as tmp:
                files = convert_onnx_to_tflite(ctx.input_path("export_onnx", "student_fp32.onnx"), Path(tmp), calib,
                                               log=ctx.log)
                shutil.copyfile(files["int8"], out)
        ctx.log(f"onnx2tf + TF converter int8 ({len(calib)} calibration samples) -> {out.name} "
                f"({out.stat().st_size / 1024:.1f} KiB)")
        return {"converter": "onnx2tf", "versions": onnx2tf_versions(),
                "seconds": round(time.perf_counter() - t0, 2), "static_batch": None, "activations": "static"}


def int8_attempts(routes: tuple[str, ...], int8_activations: str) -> list[tuple[str, str]]:
    """(route, activations) in the order tried: every route's full-integer file first; dynamic activations (int8
    weights, activations quantized at run time) only when asked for, or under auto when no static file agreed."""
    static = [(r, "static") for r in routes]
    dynamic = [("litert-torch", "dynamic")] if "litert-torch" in routes else []
    if int8_activations == "static":
        return static
    if int8_activations == "dynamic":  # onnx2tf alone: tried, so that its one-line refusal is recorded
        return dynamic or [(routes[0], "dynamic")]
    return static + dynamic
