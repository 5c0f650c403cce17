"""Static post-training int8 quantization of an ONNX model (QDQ format) with onnxruntime's quantizer."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np

from edgekd.errors import StageError, first_line


class _ArrayReader:
    """onnxruntime CalibrationDataReader over an (N, C, H, W) array, in batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 32):
        self.batches = iter([{input_name: np.ascontiguousarray(x[i:i + batch_size])}
                             for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self.batches, None)


QUANT_TYPES = {"int8": "QInt8", "uint8": "QUInt8", "uint16": "QUInt16"}


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: np.ndarray, *, per_channel: bool = True,
                 activation_type: str = "int8", reduce_range: bool = False, method: str = "minmax",
                 weight_type: str = "int8", recipe: str = "ort", stage: str = "quantize") -> dict:
    """fp32 ONNX -> QDQ ONNX. Weights are symmetric int8 (per output channel when `per_channel`) unless
    `weight_type` is uint8; activations int8 (S8S8: ARM, x86 with VNNI), uint8 (U8S8, with reduce_range on x86
    without VNNI; QNN HTP, NNAPI) or uint16 (QNN HTP's 16-bit mode, com.microsoft Q/DQ below opset 21).
    recipe "qnn" builds the configuration with onnxruntime's QNN helper (get_qnn_qdq_config), which adds the
    per-op overrides QNN's HTP needs."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize, quantize_static
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
        act_t, w_t = getattr(QuantType, QUANT_TYPES[activation_type]), getattr(QuantType, QUANT_TYPES[weight_type])
        calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                     "percentile": CalibrationMethod.Percentile}[method]
        try:
            if recipe == "qnn":
                from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

                qcfg = get_qnn_qdq_config(str(prepared), _ArrayReader(input_name, calibration),
                                          calibrate_method=calibrate, activation_type=act_t, weight_type=w_t,
                                          per_channel=per_channel, weight_symmetric=weight_type == "int8")
                quantize(str(prepared), str(out_path), qcfg)
            else:
                extra = {"WeightSymmetric": weight_type == "int8", "ActivationSymmetric": False}
                if activation_type == "uint16":
                    extra["UseQDQContribOps"] = True  # 16-bit Q/DQ is standard only from opset 21
                quantize_static(
                    str(prepared), str(out_path), _ArrayReader(input_name, calibration),
                    quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                    activation_type=act_t, weight_type=w_t, calibrate_method=calibrate, extra_options=extra,
                )
        except Exception as exc:  # noqa: BLE001 - name the failure in one line
            raise StageError(stage, f"onnxruntime quantize_static failed on {fp32_path.name}: "
                                    f"{first_line(exc)}"
                             ) from None
    model = onnx.load(str(out_path))
    ops = [n.op_type for n in model.graph.node]
    return {"activation_type": activation_type, "weight_type": weight_type, "recipe": recipe,
            "per_channel": per_channel, "reduce_range": reduce_range,
            "calibration_method": method, "calibration_samples": int(len(calibration)),
            "quantize_linear_nodes": ops.count("QuantizeLinear"), "dequantize_linear_nodes": ops.count("DequantizeLinear")}


def quant_scheme(qcfg, profile) -> tuple[str, bool, bool]:
    """(activation type, per-channel weights, reduce_range) from the pipeline's `quantize` section and the target
    profile's quantization scheme; used by post-training quantization and QAT alike."""
    act = _requested_activation_type(qcfg, profile)
    reduce_range = profile.reduce_range
    if act == "auto":  # onnxruntime's guidance for x86: S8S8 with VNNI, U8S8 + reduce_range without
        act, reduce_range = ("int8", False) if has_vnni() else ("uint8", True)
    return act, qcfg.per_channel and profile.per_channel, reduce_range


def host_vnni_key(cfg, target) -> dict:
    """The host's VNNI as part of a quantizing stage's cache key, only where it decides the scheme: under activation
    type 'auto' (x86 profiles). An ARM or NPU profile names its activation type, so its int8 model is the same on
    any host and a build moved to another machine reuses it."""
    auto = _requested_activation_type(cfg.quantize, target.quantization) == "auto"
    return {"host_vnni": has_vnni()} if auto else {}


def _requested_activation_type(qcfg, profile) -> str:
    """The pipeline's `quantize.activation_type` if set, else the target profile's (possibly 'auto')."""
    return qcfg.activation_type or profile.activation_type


def has_vnni() -> bool:
    """x86 VNNI (AVX512-VNNI or AVX-VNNI) speeds up int8 dot products and avoids U8S8 saturation issues."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags
