"""export_tflite: TFLite fp32 and full-integer int8 from the float ONNX model, parity-checked against ONNX."""

import numpy as np

from edgekd.errors import StageError
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.runtimes.ort_runner import OrtRunner
from edgekd.stages.common import load_splits, sample


class ExportTFLiteStage(Stage):
    name = "export_tflite"
    deps = ("data", "export_onnx")
    description = "convert to TFLite fp32 and int8, check parity"

    def config(self, cfg):
        if not cfg.tflite.enabled:
            return None
        return {"tflite": cfg.section("tflite"), "seed": cfg.seed}

    def run(self, ctx: StageContext) -> dict:
        from edgekd.export.tflite import convert_onnx_to_tflite
        from edgekd.runtimes.tflite_runner import TFLiteRunner

        cfg = ctx.cfg.tflite
        splits = load_splits(ctx)
        onnx_path = ctx.input_path("export_onnx", "student_fp32.onnx")
        calib = sample(splits.x_train, cfg.calibration_samples, ctx.cfg.seed + 1) if cfg.int8 else None
        files = convert_onnx_to_tflite(onnx_path, ctx.out_dir, calib, log=ctx.log)
        x = sample(splits.x_val, cfg.parity_samples, ctx.cfg.seed)
        ref = OrtRunner(onnx_path, threads=2).predict(x)
        result: dict = {"artifacts": []}
        fp32 = TFLiteRunner(files["fp32"], num_threads=2).predict(x)
        diff = float(np.abs(fp32 - ref).max())
        agree = float((fp32.argmax(1) == ref.argmax(1)).mean())
        ctx.log(f"student_fp32.tflite vs ONNX: max |diff| {diff:.2e}, top-1 agreement {agree:.4f}")
        if diff > cfg.fp32_max_abs_diff:
            raise StageError(self.name, f"student_fp32.tflite disagrees with the ONNX model: max |diff| {diff:.3g} > "
                                        f"{cfg.fp32_max_abs_diff} (a silently wrong conversion)")
        result["fp32_parity"] = {"max_abs_diff": diff, "top1_agreement": agree, "samples": int(len(x))}
        result["artifacts"].append({"name": "student_fp32.tflite", "file": files["fp32"].name, "format": "tflite",
                                    "precision": "fp32"})
        if cfg.int8:
            q = TFLiteRunner(files["int8"], num_threads=2).predict(x)
            agree = float((q.argmax(1) == ref.argmax(1)).mean())
            ctx.log(f"student_int8.tflite vs ONNX fp32: top-1 agreement {agree:.4f}")
            if agree < cfg.int8_min_agreement:
                raise StageError(self.name, f"student_int8.tflite agrees with the ONNX fp32 model on only {agree:.3f} "
                                            f"of inputs (< tflite.int8_min_agreement {cfg.int8_min_agreement})")
            result["int8_parity"] = {"top1_agreement": agree, "max_abs_diff": float(np.abs(q - ref).max()),
                                     "samples": int(len(x))}
            result["artifacts"].append({"name": "student_int8.tflite", "file": files["int8"].name,
                                        "format": "tflite", "precision": "int8"})
        return result
