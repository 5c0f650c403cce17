"""quantize: int8 QDQ ONNX by static post-training quantization, calibrated on the training split."""

import numpy as np

from edgekd.errors import StageError
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.quantize.ptq import host_vnni_key, quant_scheme, quantize_qdq
from edgekd.runtimes.ort_runner import OrtRunner
from edgekd.stages.common import load_splits, sample


class QuantizeStage(Stage):
    name = "quantize"
    deps = ("data", "export_onnx")
    uses_target = True
    description = "post-training int8 quantization (ONNX QDQ)"

    def config(self, cfg):
        return {"quantize": cfg.section("quantize"), "seed": cfg.seed}

    def extra_key(self, cfg, target):
        return host_vnni_key(cfg, target)

    def scheme(self, ctx: StageContext) -> tuple[str, bool, bool]:
        return quant_scheme(ctx.cfg.quantize, ctx.target.quantization)

    def weights(self, ctx: StageContext) -> tuple[str, str]:
        """(weight type, recipe) from the target profile: what the hardware wants."""
        prof = ctx.target.quantization
        return prof.weight_type, prof.recipe

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.cfg.quantize
        splits = load_splits(ctx)
        calib = sample(splits.x_train, cfg.calibration_samples, ctx.cfg.seed + 1)
        act, per_channel, reduce_range = self.scheme(ctx)
        weight_type, recipe = self.weights(ctx)
        fp32 = ctx.input_path("export_onnx", "student_fp32.onnx")
        out = ctx.out_dir / "student_int8.onnx"
        info = quantize_qdq(fp32, out, calib, per_channel=per_channel, activation_type=act,
                            reduce_range=reduce_range, method=cfg.calibration_method, weight_type=weight_type,
                            recipe=recipe, stage=self.name)
        x = sample(splits.x_val, 512, ctx.cfg.seed)
        ref = OrtRunner(fp32, threads=2).predict(x)
        got = OrtRunner(out, threads=2).predict(x)
        agreement = float((ref.argmax(1) == got.argmax(1)).mean())
        ctx.log(f"student_int8.onnx: {act} activations, {'per-channel' if per_channel else 'per-tensor'} {weight_type} "
                f"weights ({recipe} recipe), {len(calib)} calibration images; top-1 agreement with fp32 {agreement:.4f}")
        if agreement < cfg.min_fp32_agreement:
            raise StageError(self.name, f"int8 model agrees with the fp32 model on only {agreement:.3f} of "
                                        f"validation images (< quantize.min_fp32_agreement "
                                        f"{cfg.min_fp32_agreement}); try calibration_method: entropy or QAT")
        return {**info, "fp32_agreement": agreement, "max_abs_diff_vs_fp32": float(np.abs(ref - got).max()),
                "artifacts": [{"name": "student_int8.onnx", "file": "student_int8.onnx", "format": "onnx",
                               "precision": "int8"}]}
