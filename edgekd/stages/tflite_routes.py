"""What export_tflite and quantize_tflite share: the route order per `tflite.converter` and student, and the checks
a route's file must pass before it counts (loads in LiteRT without TensorFlow, in a fresh process; matches the
float ONNX model on validation images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekd.errors import StageError
from edgekd.pipeline.engine import StageContext
from edgekd.stages.common import sample

ROUTES: dict[str, tuple[str, ...]] = {"litert-torch": ("litert-torch",), "onnx2tf": ("onnx2tf",)}


def route_order(converter: str, student) -> tuple[str, ...]:
    """The routes to try, in order, for `tflite.converter` and the student's model section.

    auto, any model but the built-ins: litert-torch first. On the 14-architecture matrix it converted more models
    (incl. the int8 resnet18 and shufflenet files the onnx2tf route makes and XNNPACK rejects, and the transformers
    onnx2tf cannot take) and did it several times faster; onnx2tf is the fallback (and keeps a dynamic batch).
    auto, edgekd's built-in CNNs: onnx2tf first. Both routes convert them with equal accuracy, but for these tiny
    models the cost is start-up, and onnx2tf runs in edgekd's own process: the default student took 6.8 s (fp32 +
    int8) against litert-torch's 22 s (a torch.export, then a worker process that imports torch and litert_torch,
    per file). litert-torch is the fallback (it converts GELU, whose Erf onnx2tf can only write as a Flex op)."""
    if converter != "auto":
        return ROUTES[converter]
    from edgekd.models.sources import source_of

    return ("onnx2tf", "litert-torch") if source_of(student).kind == "builtin" else ("litert-torch", "onnx2tf")


def _reference(ctx: StageContext, splits) -> tuple[np.ndarray, np.ndarray]:
    """(validation images, float ONNX logits on them): what every TFLite file is compared with."""
    from edgekd.runtimes.ort_runner import OrtRunner

    x = sample(splits.x_val, ctx.cfg.tflite.parity_samples, ctx.cfg.seed)
    return x, OrtRunner(ctx.input_path("export_onnx", "student_fp32.onnx"), threads=2).predict(x)


def _run(path: Path, x: np.ndarray, stage: str) -> np.ndarray:
    from edgekd.runtimes.tflite_runner import TFLiteRunner, check_loads_without_tensorflow

    check_loads_without_tensorflow(path, stage)  # a file XNNPACK rejects must not abort the build's process
    return TFLiteRunner(path, num_threads=2).predict(x)


def check_fp32(ctx: StageContext, path: Path, splits, stage: str) -> dict:
    """Parity of an fp32 file with the float ONNX model; raises StageError beyond tflite.fp32_max_abs_diff."""
    cfg = ctx.cfg.tflite
    x, ref = _reference(ctx, splits)
    got = _run(path, x, stage)
    diff = float(np.abs(got - ref).max())
    span = float(ref.max() - ref.min()) or 1.0
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    ctx.log(f"{path.name} vs ONNX: max |diff| {diff:.2e} ({diff / span:.1e} of the logit range), "
            f"top-1 agreement {agree:.4f} on {len(x)} validation images")
    if not np.isfinite(diff) or diff > cfg.fp32_max_abs_diff:
        raise StageError(stage, f"{path.name} disagrees with the ONNX model: max |diff| {diff:.3g} > "
                                f"tflite.fp32_max_abs_diff {cfg.fp32_max_abs_diff} (a silently wrong conversion)")
    return {"max_abs_diff": diff, "max_abs_diff_rel_logit_range": diff / span, "top1_agreement": agree,
            "samples": int(len(x))}


def check_int8(ctx: StageContext, path: Path, splits, stage: str) -> dict:
    """Top-1 agreement of an int8 file with the float ONNX model; raises below tflite.int8_min_agreement."""
    cfg = ctx.cfg.tflite
    x, ref = _reference(ctx, splits)
    got = _run(path, x, stage)
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    span = float(ref.max() - ref.min()) or 1.0
    diff = float(np.abs(got - ref).max())
    ctx.log(f"{path.name} vs ONNX fp32: top-1 agreement {agree:.4f}, max |diff| {diff / span:.3f} of the logit range")
    if agree < cfg.int8_min_agreement:
        raise StageError(stage, f"{path.name} agrees with the ONNX fp32 model on only {agree:.3f} of inputs "
                                f"(< tflite.int8_min_agreement {cfg.int8_min_agreement})")
    return {"top1_agreement": agree, "max_abs_diff": diff, "max_abs_diff_rel_logit_range": diff / span,
            "samples": int(len(x))}


def describe_file(path: Path) -> dict:
    """Size and op histogram (float islands, QUANTIZE/DEQUANTIZE pairs, transposes) of a .tflite file."""
    from edgekd.export.tflite_ops import op_summary

    return {"size_bytes": path.stat().st_size, "ops": op_summary(path)}


def failure_line(name: str, tried: list[dict]) -> str:
    return f"no converter made a working {name}: " + "; ".join(f"{t['converter']}: {t['error']}" for t in tried)
