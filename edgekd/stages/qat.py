"""qat: quantization-aware training of the (pruned) student with the KD loss on; int8 ONNX (+ TFLite) from it."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgekd.compress.qat import (clamped_float_model, convert, fake_quant_ranges, float_weight_kernels, make_quantizer,
                                prepare_qat, unshare_dequantize)
from edgekd.distill.run import distill_model
from edgekd.distill.trainer import accuracy, predict_logits
from edgekd.distributed import world
from edgekd.errors import StageError, first_line
from edgekd.export.onnx_export import export_onnx
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.quantize.ptq import host_vnni_key, quant_scheme
from edgekd.runtimes.ort_runner import OrtRunner, optimized_op_types
from edgekd.stages.common import batch_teacher, load_splits, load_student, sample


class QATStage(Stage):
    name = "qat"
    distributed = True  # trains: every rank of a distributed build takes part
    deps = ("data", "teacher", "distill")
    optional_deps = ("prune",)  # trains the pruned student when pruning is on
    uses_target = True
    description = "quantization-aware training (PT2E) -> int8 ONNX and TFLite"

    def config(self, cfg):
        if not cfg.qat.enabled:
            return None
        return {"qat": cfg.section("qat"), "quantize": {k: cfg.section("quantize")[k]
                                                        for k in ("activation_type", "per_channel")},
                "opset": cfg.export.opset, "seed": cfg.seed}

    def extra_key(self, cfg, target):
        return host_vnni_key(cfg, target)

    def run(self, ctx: StageContext) -> dict:
        cfg = ctx.cfg.qat
        splits = load_splits(ctx)
        student = load_student(ctx, splits)
        act, per_channel, reduce_range = quant_scheme(ctx.cfg.quantize, ctx.target.quantization)
        scheme = {"activation_type": act, "per_channel": per_channel, "reduce_range": reduce_range,
                  "weights": "symmetric int8" + (" per output channel" if per_channel else " per tensor")}
        float_acc = accuracy(predict_logits(student, splits.x_test), splits.y_test)
        try:
            prepared = prepare_qat(student, splits.x_train, make_quantizer(act, per_channel, reduce_range))
        except Exception as exc:  # noqa: BLE001 - export / torchao annotation failures: one line naming the cause
            raise StageError(self.name, f"cannot prepare {ctx.cfg.student.arch} for QAT (torchao PT2E): "
                                        f"{first_line(exc)}") from None
        ctx.log(f"{'pruned ' if ctx.has_input('prune') else ''}student prepared for QAT: "
                f"{fake_quant_ranges(prepared)} fake-quantizers, {act} activations, {scheme['weights']} weights; "
                f"float test accuracy {float_acc:.4f}")

        teacher, cache_file, weights = batch_teacher(ctx, splits)
        try:
            result = distill_model(prepared, cfg, splits, teacher, cache_file, weights, seed=ctx.cfg.seed,
                                   work_dir=ctx.work_dir, log=ctx.log, stage="qat", amp=False).result
        except RuntimeError as exc:  # torchao's fake-quantize ops (e.g. a degenerate observed range)
            raise StageError(self.name, f"QAT training of {ctx.cfg.student.arch} failed in torchao's fake-quantized "
                                        f"graph: {first_line(exc)}") from None
        if not world().is_main:  # a distributed build: rank 0 alone converts, exports and checks
            return {}
        converted = convert(prepared)
        torch_logits = predict_logits(converted, splits.x_test)
        torch_acc = accuracy(torch_logits, splits.y_test)

        onnx_path = ctx.out_dir / "student_qat_int8.onnx"
        info = export_onnx(converted, sample(splits.x_val, 64, ctx.cfg.seed), onnx_path, opset=ctx.cfg.export.opset,
                           stage=self.name)
        qdq = onnx.load(str(onnx_path))
        copies = unshare_dequantize(qdq)
        if copies:  # a Q/DQ pair shared by a conv and a residual add keeps the conv in float in onnxruntime
            onnx.checker.check_model(qdq)
            onnx.save(qdq, str(onnx_path))
        ort_logits = OrtRunner(onnx_path, threads=2).predict(splits.x_test)
        ort_acc = accuracy(ort_logits, splits.y_test)
        with tempfile.TemporaryDirectory() as tmp:
            ran_ops = optimized_op_types(onnx_path, tmp)
            float_weights, float_activations = float_weight_kernels(onnx_path, tmp)
        integer = [op for op in ran_ops if op.startswith("QLinear") or op in ("QGemm", "ConvInteger", "MatMulInteger")]
        ctx.log(f"student_qat_int8.onnx: test accuracy onnxruntime {ort_acc:.4f}, torch (converted) {torch_acc:.4f}, "
                f"float {float_acc:.4f}; onnxruntime runs {', '.join(ran_ops)}"
                + (f"; {len(float_activations)} activation x activation MatMuls stay float (attention)"
                   if float_activations else ""))
        n_integer = sum(1 for n in qdq.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")) - len(float_weights)
        if not integer or len(float_weights) > max(n_integer, 0):
            raise StageError(self.name, f"student_qat_int8.onnx does not run integer kernels in onnxruntime for "
                                        f"{len(float_weights)} weight layer(s), e.g. {', '.join(float_weights[:3])} "
                                        f"(optimized graph ops: {', '.join(ran_ops)})")
        if float_weights:  # a tensor two layers read, or an activation the quantizer leaves float (SiLU, GELU...)
            ctx.log(f"student_qat_int8.onnx: {len(float_weights)} weight layer(s) still run in float in onnxruntime "
                    f"(e.g. {', '.join(float_weights[:3])}): their output is not quantized (an activation the "
                    f"quantizer does not annotate) or feeds two layers")
        artifacts = [{"name": "student_qat_int8.onnx", "file": onnx_path.name, "format": "onnx", "precision": "int8"}]
        summary = {"scheme": scheme, "epochs": cfg.epochs, "alpha": cfg.alpha, "temperature": cfg.temperature,
                   "history": result.history, "resumed_from_epoch": result.resumed_from_epoch,
                   "train_seconds": result.seconds, "train_processes": result.processes,
                   "pruned": ctx.has_input("prune"),
                   "test_accuracy_float": float_acc, "test_accuracy_torch_converted": torch_acc,
                   "test_accuracy_onnxruntime": ort_acc,
                   "onnxruntime_vs_torch_top1_agreement":
                       float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean()),
                   "onnx": {**info, "onnxruntime_optimized_op_types": ran_ops, "qdq_pairs_unshared": copies,
                            "float_activation_matmuls": len(float_activations),
                            "float_weight_layers": float_weights}}
        if cfg.tflite:
            summary["tflite"] = self._tflite(ctx, splits, onnx_path)
            artifacts.append({"name": "student_qat_int8.tflite", "file": "student_qat_int8.tflite",
                              "format": "tflite", "precision": "int8"})
        return {**summary, "artifacts": artifacts}

    def _tflite(self, ctx: StageContext, splits, qdq_path: Path) -> dict:
        """The QAT model as full-integer TFLite: TF's converter on the float model with the QAT-learned weights and
        activation ranges (clamped); never onnx2tf on the QDQ graph (STACK.md trap 4). Parity vs the QAT ONNX."""
        import onnx

        from edgekd.export.tflite import convert_onnx_to_tflite
        from edgekd.runtimes.tflite_runner import TFLiteRunner, check_loads_without_tensorflow

        cfg = ctx.cfg.qat
        try:
            clamped, clamps = clamped_float_model(onnx.load(str(qdq_path)))
        except ValueError as exc:
            raise StageError(self.name, f"cannot turn the QAT graph into its clamped float model: {exc}") from None
        calib = sample(splits.x_train, cfg.calibration_samples, ctx.cfg.seed + 1)
        with tempfile.TemporaryDirectory() as tmp:
            float_path = Path(tmp) / "student_qat_clamped_fp32.onnx"
            onnx.save(clamped, str(float_path))
            try:
                paths = convert_onnx_to_tflite(float_path, Path(tmp), calib, fp32_name="qat_clamped_fp32.tflite",
                                               int8_name="student_qat_int8.tflite", log=ctx.log)
            except StageError as exc:
                raise StageError(self.name, f"QAT TFLite: {exc}") from None
            shutil.copyfile(paths["int8"], ctx.out_dir / "student_qat_int8.tflite")
            check_loads_without_tensorflow(ctx.out_dir / "student_qat_int8.tflite", self.name)
        x = sample(splits.x_val, 1024, ctx.cfg.seed)
        ref = OrtRunner(qdq_path, threads=2).predict(x)
        got = TFLiteRunner(ctx.out_dir / "student_qat_int8.tflite", num_threads=2).predict(x)
        agreement = float((ref.argmax(1) == got.argmax(1)).mean())
        scale = float(np.abs(ref).max()) or 1.0
        ctx.log(f"student_qat_int8.tflite: {clamps} activation ranges from QAT; top-1 agreement with "
                f"student_qat_int8.onnx {agreement:.4f} on {len(x)} validation images, max |diff| "
                f"{float(np.abs(ref - got).max()):.3g} (logit scale {scale:.3g})")
        if agreement < cfg.min_tflite_agreement:
            raise StageError(self.name, f"student_qat_int8.tflite agrees with student_qat_int8.onnx on only "
                                        f"{agreement:.3f} of validation images (< qat.min_tflite_agreement "
                                        f"{cfg.min_tflite_agreement}): not shipped as the QAT model")
        return {"route": "QAT weights (BN folded, dequantized) + activations clamped to the QAT ranges -> onnx2tf "
                         "SavedModel -> TF converter full-integer int8", "clamped_activations": clamps,
                "calibration_samples": int(len(calib)), "agreement_vs_qat_onnx": agreement,
                "max_abs_diff_vs_qat_onnx": float(np.abs(ref - got).max()), "parity_samples": int(len(x))}
