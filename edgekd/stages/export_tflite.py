"""export_tflite: TFLite fp32 from the float ONNX model (onnx2tf), parity-checked against ONNX; keeps onnx2tf's
SavedModel for quantize_tflite, so an int8 conversion failure never costs the fp32 model."""

import numpy as np

from edgekd.errors import StageError
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.runtimes.ort_runner import OrtRunner
from edgekd.stages.common import load_splits, sample


class ExportTFLiteStage(Stage):
    name = "export_tflite"
    deps = ("data", "export_onnx")
    description = "convert to TFLite fp32, check parity"

    def config(self, cfg):
        if not cfg.tflite.enabled:
            return None
        return {"tflite": {k: v for k, v in cfg.section("tflite").items()
                           if k not in ("int8", "calibration_samples", "int8_min_agreement")}, "seed": cfg.seed}

    def run(self, ctx: StageContext) -> dict:
        from edgekd.export.tflite import convert_onnx_to_tflite
        from edgekd.runtimes.tflite_runner import TFLiteRunner, check_loads_without_tensorflow

        cfg = ctx.cfg.tflite
        splits = load_splits(ctx)
        onnx_path = ctx.input_path("export_onnx", "student_fp32.onnx")
        files = convert_onnx_to_tflite(onnx_path, ctx.out_dir, None, log=ctx.log,
                                       saved_model_out=ctx.out_dir / "saved_model")
        check_loads_without_tensorflow(files["fp32"], self.name)
        x = sample(splits.x_val, cfg.parity_samples, ctx.cfg.seed)
        ref = OrtRunner(onnx_path, threads=2).predict(x)
        fp32 = TFLiteRunner(files["fp32"], num_threads=2).predict(x)
        diff = float(np.abs(fp32 - ref).max())
        agree = float((fp32.argmax(1) == ref.argmax(1)).mean())
        ctx.log(f"student_fp32.tflite vs ONNX: max |diff| {diff:.2e}, top-1 agreement {agree:.4f}")
        if diff > cfg.fp32_max_abs_diff:
            raise StageError(self.name, f"student_fp32.tflite disagrees with the ONNX model: max |diff| {diff:.3g} > "
                                        f"{cfg.fp32_max_abs_diff} (a silently wrong conversion)")
        return {"fp32_parity": {"max_abs_diff": diff, "top1_agreement": agree, "samples": int(len(x))},
                "artifacts": [{"name": "student_fp32.tflite", "file": files["fp32"].name, "format": "tflite",
                               "precision": "fp32"}]}
