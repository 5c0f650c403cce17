"""A static-shape copy of an ONNX model, for accelerators that compile fixed shapes only (QNN HTP, NNAPI, CoreML).

edgekd exports with a dynamic batch (`batch`). The copy fixes every graph input's batch dimension to `batch`
(onnxruntime's own make_input_shape_fixed, the code behind `python -m onnxruntime.tools.make_dynamic_shape_fixed`),
re-runs ONNX shape inference from scratch and refuses a result that still has a dynamic value, naming it.
"""

from __future__ import annotations

from pathlib import Path

from edgekd.errors import StageError


def make_static_copy(src: Path, dst: Path, batch: int = 1, stage: str = "benchmark") -> dict:
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, is_fixed_size_tensor, make_input_shape_fixed

    model = onnx.load(str(src))
    shapes = {}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if not dims:
            raise StageError(stage, f"{src.name}: input {inp.name!r} has no shape; cannot make it static")
        fixed = [batch] + [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if None in fixed:
            raise StageError(stage, f"{src.name}: input {inp.name!r} has a dynamic non-batch dimension "
                                    f"{[d.dim_param or d.dim_value for d in dims]}; export it with fixed H, W")
        if dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            raise StageError(stage, f"{src.name}: input {inp.name!r} has a fixed batch {dims[0].dim_value}, "
                                    f"not the profile's static_batch_size {batch}")
        make_input_shape_fixed(model.graph, inp.name, fixed)
        shapes[inp.name] = fixed
    del model.graph.value_info[:]  # stale symbolic shapes from quant_pre_process; inferred again below
    for out in model.graph.output:
        if out.type.tensor_type.shape.dim and not out.type.tensor_type.shape.dim[0].HasField("dim_value"):
            out.type.tensor_type.shape.dim[0].Clear()
    fix_output_shapes(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dynamic = [v.name for v in [*model.graph.value_info, *model.graph.output] if not is_fixed_size_tensor(v)]
    if dynamic:
        raise StageError(stage, f"{src.name}: still dynamic after fixing the batch to {batch}: "
                                f"{', '.join(dynamic[:5])}{' ...' if len(dynamic) > 5 else ''}")
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return {"input_shapes": shapes, "batch": batch}
