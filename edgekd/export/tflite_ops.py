"""What is inside a .tflite file, read from its flatbuffer (no interpreter: an unverified file is never loaded in
the build's own process).

`op_summary(path)` -> {"ops": {OP_NAME: count}, "total", "float_ops", "int8_ops", "quantize", "dequantize",
"transpose", "static_batch"}. A "float op" is a compute op (not QUANTIZE/DEQUANTIZE/shape plumbing) whose first
input tensor is float32: in an int8 file those are the float islands that run unquantized on the target.
"""

from __future__ import annotations

from pathlib import Path

_PLUMBING = {"QUANTIZE", "DEQUANTIZE", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE", "PACK", "UNPACK", "GATHER",
             "STRIDED_SLICE", "SLICE", "CONCATENATION", "TRANSPOSE", "CAST"}


def _names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def op_summary(path: str | Path) -> dict:
    from ai_edge_litert import schema_py_generated as schema

    buf = Path(path).read_bytes()
    model = schema.Model.GetRootAsModel(buf, 0)
    op_names = _names(schema.BuiltinOperator)
    type_names = _names(schema.TensorType)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        name = op_names.get(code, str(code))
        if name == "CUSTOM":
            name = f"CUSTOM:{(oc.CustomCode() or b'').decode(errors='replace')}"
        codes.append(name)
    ops: dict[str, int] = {}
    float_ops = int8_ops = 0
    graph = model.Subgraphs(0)
    for j in range(graph.OperatorsLength()):
        op = graph.Operators(j)
        name = codes[op.OpcodeIndex()]
        ops[name] = ops.get(name, 0) + 1
        if name in _PLUMBING or op.InputsLength() == 0 or op.Inputs(0) < 0:
            continue
        dtype = type_names.get(graph.Tensors(op.Inputs(0)).Type(), "?")
        if dtype == "FLOAT32":
            float_ops += 1
        elif dtype in ("INT8", "UINT8", "INT16"):
            int8_ops += 1
    inp = graph.Tensors(graph.Inputs(0))
    sig = inp.ShapeSignatureAsNumpy() if inp.ShapeSignatureLength() else inp.ShapeAsNumpy()
    return {"ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "total": sum(ops.values()),
            "float_ops": float_ops, "int8_ops": int8_ops, "quantize": ops.get("QUANTIZE", 0),
            "dequantize": ops.get("DEQUANTIZE", 0), "transpose": ops.get("TRANSPOSE", 0),
            "static_batch": None if int(sig[0]) == -1 else int(sig[0])}
