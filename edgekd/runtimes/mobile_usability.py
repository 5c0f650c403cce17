"""NNAPI / CoreML partition coverage from onnxruntime's mobile usability checker.

The PyPI onnxruntime has neither EP (asking for one only warns and runs on CPU), so their placement cannot be
observed on this host. onnxruntime ships the static analysis behind
`python -m onnxruntime.tools.check_onnx_model_mobile_usability`: it optimizes the model to the BASIC level (as ORT
Mobile would), runs shape inference and partitions the graph by each EP's supported-op table. This module calls the
same functions and returns the numbers instead of log text. The checker checks op types and shapes; the per-op
caveats it lists (e.g. "weights should be constant") are not checked and are carried into the report.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

CHECKERS = {
    "nnapi": ("NnapiExecutionProvider", None),
    "coreml-mlprogram": ("CoreMLExecutionProvider", "coreml_supported_mlprogram_ops.md"),
    "coreml-neuralnetwork": ("CoreMLExecutionProvider", "coreml_supported_neuralnetwork_ops.md"),
}


def mobile_placement(model_path: Path, checker: str) -> dict:
    import logging

    import onnx
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    ep_name, table = CHECKERS[checker]
    logging.getLogger("usability_checker").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / model_path.name
        optimize_model(model_path, optimized, use_external_initializers=True)  # what the checker's CLI does
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
        if checker == "nnapi":
            info = uc.check_nnapi_partitions(model, require_fixed_input_sizes=True)
        else:
            info = uc.check_coreml_partitions(model, True, table)
    nodes = list(model.graph.node)
    supported = {n.name for group in info.supported_groups for n in group}
    on_ep = [n for n in nodes if n.name in supported]
    elsewhere = [n for n in nodes if n.name not in supported]
    total = len(nodes)
    return {
        "provider": ep_name, "source": f"onnxruntime mobile usability checker ({checker}; "
                                       "python -m onnxruntime.tools.check_onnx_model_mobile_usability)",
        "nodes_total": total, "nodes_on_provider": len(on_ep), "nodes_elsewhere": len(elsewhere),
        "fraction_on_provider": (len(on_ep) / total) if total else 0.0,
        "partitions": int(info.num_partitions),
        "ops_on_provider": dict(Counter(n.op_type for n in on_ep)),
        "ops_elsewhere": dict(Counter(n.op_type for n in elsewhere)),
        "nodes_elsewhere_list": [{"name": n.name, "op": n.op_type, "provider": "CPUExecutionProvider"}
                                 for n in elsewhere[:100]],
        "unsupported_ops": sorted(info.unsupported_ops),
        "nodes_unsupported_due_to_op": int(info.nodes_unsupported_due_to_op),
        "nodes_unsupported_due_to_dynamic_shape": int(info.nodes_unsupported_due_to_dynamic_input),
        "suitability": info.suitability().name,
        "unchecked_caveats": info.supported_ops_checker.get_caveats(),
        "onnx_opset": next((o.version for o in onnx.load(str(model_path), load_external_data=False).opset_import
                            if o.domain in ("", "ai.onnx")), None),
    }
