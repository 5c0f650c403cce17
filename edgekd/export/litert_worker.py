"""Runs inside the `litert-torch` environment (see edgekd.runtimes.envs): one PyTorch -> TFLite conversion.

    python -m edgekd.export.litert_worker REQUEST.json

The request names a saved `torch.export` program (NHWC float input in [0, 1], batch 1, logits out), the output
.tflite, the precision, and for int8 a .npy of NHWC float calibration images. Imports only torch, torchao and
litert_torch (plus numpy): the model's own code is not needed, the program carries the graph and weights.

int8 is litert-torch's PT2E route: prepare_pt2e with its PT2EQuantizer (symmetric, per-channel weights, static
activations), calibration at batch 1, convert_pt2e(fold_quantize=False), then litert_torch.convert with the
quantizer: a float input tensor quantized by the file's first op (QUANTIZE), int8 inside and at the output.
With `"activations": "dynamic"` the quantizer's dynamic config instead: int8 weights, activations
quantized at run time from each input's own range (float input and output; the calibration pass is harmless).

Prints one JSON line `{"ok": true, ...}` as its last stdout line; on failure `{"ok": false, "error": "<one line>"}`
and exit code 2.
"""

from __future__ import annotations

import json
import re
import sys
import time


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    # name the op when the converter's message carries one (aten ops from torch.export / lowering, tfl ops from MLIR)
    op = re.search(r"\b(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?|tfl\.[A-Za-z0-9_]+|stablehlo\.[A-Za-z0-9_]+)", text)
    if op and op.group(1) not in first:
        first = f"{first} (op {op.group(1)})"
    return first[:400]


def convert(request: dict) -> dict:
    import numpy as np
    import torch

    import litert_torch

    t0 = time.perf_counter()
    program = torch.export.load(request["program"])
    module = program.module()
    shape = tuple(request["input_shape_nhwc"])
    example = (torch.rand(shape, generator=torch.Generator().manual_seed(0)),)
    if request["precision"] == "fp32":
        edge = litert_torch.convert(module, example)
    else:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        dynamic = request.get("activations", "static") == "dynamic"  # int8 weights, activations quantized per run
        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                 is_dynamic=dynamic))
        prepared = prepare_pt2e(module, quantizer)
        calib = np.load(request["calibration"])
        with torch.no_grad():
            for i in range(len(calib)):  # the program's batch is static (1)
                prepared(torch.from_numpy(calib[i:i + 1]))
        quantized = convert_pt2e(prepared, fold_quantize=False)
        edge = litert_torch.convert(quantized, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    edge.export(request["out"])
    import importlib.metadata as md

    return {"ok": True, "seconds": round(time.perf_counter() - t0, 2),
            "versions": {d: md.version(d) for d in ("litert-torch", "ai-edge-litert", "torch", "torchao")}}


def main(argv: list[str]) -> int:
    request = json.loads(open(argv[1]).read())
    try:
        result = convert(request)
    except Exception as exc:  # noqa: BLE001 -- reported as one line to the build, which fails the route
        print(json.dumps({"ok": False, "error": _one_line(exc)}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
