"""quantize_tflite: full-integer int8 TFLite from export_tflite's SavedModel (TF's converter, calibrated on training
images), checked for top-1 agreement with the float ONNX model. A stage of its own, so its failure (an op TF's int8
converter does not take, say) leaves the fp32 TFLite built, evaluated and benchmarked."""

from edgekd.errors import StageError
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.runtimes.ort_runner import OrtRunner
from edgekd.stages.common import load_splits, sample


class QuantizeTFLiteStage(Stage):
    name = "quantize_tflite"
    deps = ("data", "export_onnx", "export_tflite")
    description = "int8 TFLite from the SavedModel, check agreement"

    def config(self, cfg):
        if not (cfg.tflite.enabled and cfg.tflite.int8):
            return None
        return {"tflite": cfg.section("tflite"), "seed": cfg.seed}

    def run(self, ctx: StageContext) -> dict:
        import numpy as np

        from edgekd.export.tflite import quantize_saved_model_int8
        from edgekd.runtimes.tflite_runner import TFLiteRunner, check_loads_without_tensorflow

        cfg = ctx.cfg.tflite
        splits = load_splits(ctx)
        saved_model = ctx.input_path("export_tflite", "saved_model/saved_model.pb").parent
        calib = sample(splits.x_train, cfg.calibration_samples, ctx.cfg.seed + 1)
        out = quantize_saved_model_int8(saved_model, calib, ctx.out_dir / "student_int8.tflite", stage=self.name)
        check_loads_without_tensorflow(out, self.name)
        ctx.log(f"int8 (full-integer, {len(calib)} calibration samples) -> {out.name} "
                f"({out.stat().st_size / 1024:.1f} KiB)")
        x = sample(splits.x_val, cfg.parity_samples, ctx.cfg.seed)
        ref = OrtRunner(ctx.input_path("export_onnx", "student_fp32.onnx"), threads=2).predict(x)
        q = TFLiteRunner(out, num_threads=2).predict(x)
        agree = float((q.argmax(1) == ref.argmax(1)).mean())
        ctx.log(f"student_int8.tflite vs ONNX fp32: top-1 agreement {agree:.4f}")
        if agree < cfg.int8_min_agreement:
            raise StageError(self.name, f"student_int8.tflite agrees with the ONNX fp32 model on only {agree:.3f} "
                                        f"of inputs (< tflite.int8_min_agreement {cfg.int8_min_agreement})")
        return {"int8_parity": {"top1_agreement": agree, "max_abs_diff": float(np.abs(q - ref).max()),
                                "samples": int(len(x))},
                "calibration_samples": int(len(calib)),
                "artifacts": [{"name": "student_int8.tflite", "file": out.name, "format": "tflite",
                               "precision": "int8"}]}
