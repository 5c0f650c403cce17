"""Static post-training int8 quantization of an ONNX model (QDQ format) with onnxruntime's quantizer."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np

from edgekd.errors import StageError


class _ArrayReader:
    """onnxruntime CalibrationDataReader over an (N, C, H, W) array, in batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 32):
        self.batches = iter([{input_name: np.ascontiguousarray(x[i:i + batch_size])}
                             for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: np.ndarray, *, per_channel: bool = True,
                 activation_type: str = "int8", reduce_range: bool = False, method: str = "minmax",
                 stage: str = "quantize") -> dict:
    """fp32 ONNX -> int8 QDQ ONNX. Weights are symmetric int8 (per output channel when `per_channel`);
    activations int8 (S8S8: ARM, x86 with VNNI) or uint8 (U8S8, with reduce_range on x86 without VNNI)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger("root").setLevel(logging.ERROR)
    input_name = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the original if it fails
            prepared = fp32_path
        try:
            quantize_static(
                str(prepared), str(out_path), _ArrayReader(input_name, calibration),
                quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[method],
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        except Exception as exc:  # noqa: BLE001 - name the failure in one line
            raise StageError(stage, f"onnxruntime quantize_static failed on {fp32_path.name}: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                             ) from None
    model = onnx.load(str(out_path))
    ops = [n.op_type for n in model.graph.node]
    return {"activation_type": activation_type, "per_channel": per_channel, "reduce_range": reduce_range,
            "calibration_method": method, "calibration_samples": int(len(calibration)),
            "quantize_linear_nodes": ops.count("QuantizeLinear"), "dequantize_linear_nodes": ops.count("DequantizeLinear")}


def has_vnni() -> bool:
    """x86 VNNI (AVX512-VNNI or AVX-VNNI) speeds up int8 dot products and avoids U8S8 saturation issues."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags
