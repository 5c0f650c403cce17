"""PyTorch -> single-file ONNX with a dynamic batch, simplified with onnxsim, checked, and parity-tested."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgekd.errors import StageError, first_line


def export_onnx(model: nn.Module, example: np.ndarray, path: Path, opset: int = 18, stage: str = "export_onnx") -> dict:
    """Export `model` (eval mode) to `path` as one file (weights inside), batch dimension dynamic.

    example: (N, C, H, W) float32, N >= 2 (a batch of 1 would let the exporter specialise the batch dim).
    Returns {"opset", "simplified", "nodes"}.
    """
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(example[:2]))
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet():
        try:
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},), optimize=True,
                                        verbose=False)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types; name the op it failed on
            raise StageError(stage, f"torch.onnx.export failed: {first_line(exc)}") from None
    proto = program.model_proto
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise StageError(stage, f"exported model fails onnx.checker: {first_line(exc)}") from None
    simplified = False
    try:
        import onnxsim

        with _quiet():
            simple, ok = onnxsim.simplify(proto)
        if ok:
            proto, simplified = simple, True
    except Exception as exc:  # noqa: BLE001 - onnxsim is an optimisation: keep the checked model if it fails
        warnings.warn(f"onnxsim could not simplify {path.name}: {first_line(exc)}")
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(proto.SerializeToString())  # single file: the caller's out_dir is renamed into place atomically
    return {"opset": opset, "simplified": simplified, "nodes": len(proto.graph.node),
            "op_types": sorted({n.op_type for n in proto.graph.node})}


def parity(model: nn.Module, onnx_path: Path, x: np.ndarray) -> dict:
    """Max abs difference and top-1 agreement of torch vs onnxruntime logits on real inputs x (N, C, H, W)."""
    from edgekd.runtimes.ort_runner import OrtRunner

    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    got = OrtRunner(onnx_path, threads=2).predict(x)
    return {"max_abs_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "samples": int(len(x))}


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter and onnxsim print progress to stdout; keep the build log readable."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
