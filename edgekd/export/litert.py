"""PyTorch -> TFLite with Google's litert-torch (no ONNX, no TensorFlow graphs), fp32 and int8 (PT2E).

litert-torch cannot share edgekd's venv (it needs ai-edge-litert 2.3.x, onnx2tf pins 2.1.0), so the conversion runs
in the on-demand `litert-torch` environment (edgekd.runtimes.envs: created once, cached, an overlay over edgekd's
own torch), as `python -m edgekd.export.litert_worker`. What crosses the process boundary is a `torch.export`
program, not the model's code: here the student is wrapped to take NHWC input (the layout TFLite apps and edgekd's
TFLite runner use) and exported strictly (strict export lets the int8 quantizer see residual adds; non-strict
export, the fallback, leaves some of them float) at a static batch of 1, because litert-torch cannot keep a
dynamic batch (`Shapes must be 1D sequences of concrete values`). Batch 1 is what phone apps load; edgekd's runner
runs fixed-batch files one chunk at a time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgekd.errors import EdgekdError, StageError, first_line

CONVERTER = "litert-torch"
WORKER_TIMEOUT_S = 3600


class ChannelsLastInput(nn.Module):
    """model(x_nchw) as a model of NHWC input: (1, H, W, C) float in [0, 1] -> logits (1, classes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 3, 1, 2))


def export_program(model: nn.Module, chw: tuple[int, int, int], path: Path) -> str:
    """Save `model` (NCHW) as a batch-1 NHWC torch.export program at `path`; returns "strict" or "non-strict"."""
    wrapped = ChannelsLastInput(model).eval()
    example = (torch.rand(1, chw[1], chw[2], chw[0], generator=torch.Generator().manual_seed(0)),)
    try:
        program, mode = torch.export.export(wrapped, example, strict=True), "strict"
    except Exception:  # noqa: BLE001 -- dynamo cannot trace every model; non-strict export traces what runs
        program, mode = torch.export.export(wrapped, example, strict=False), "non-strict"
    torch.export.save(program, str(path))
    return mode


def convert_with_litert_torch(model: nn.Module, chw: tuple[int, int, int], out_path: Path, precision: str,
                              calibration_nchw: np.ndarray | None = None, *, stage: str,
                              log: Callable[[str], None] = print, activations: str = "static") -> dict:
    """Write `out_path` (.tflite, NHWC input, static batch 1) from `model`; int8 needs `calibration_nchw`
    (N, C, H, W) float images, and `activations` "static" (full integer) or "dynamic" (int8 weights, activations
    quantized at run time). Returns {"converter", "versions", "seconds", "export", "static_batch"} (+ "activations"
    for int8).
    Raises StageError(stage, "litert-torch ...: <one line>") on any failure."""
    from edgekd.runtimes import envs

    assert precision in ("fp32", "int8")
    t0 = time.perf_counter()
    try:
        env = envs.ensure_env(CONVERTER, log)
    except (EdgekdError, OSError) as exc:  # no index, no disk space, an unwritable EDGEKD_ENV_DIR
        raise StageError(stage, f"cannot create its environment: {first_line(exc)}") from None
    with tempfile.TemporaryDirectory(prefix="edgekd_litert_") as tmp:
        tmp = Path(tmp)
        program = tmp / "model.pt2"
        try:
            mode = export_program(model.eval(), chw, program)
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StageError(stage, f"torch.export of the student failed: "
                                    f"{type(exc).__name__}: {first[:300]}") from None
        request = {"program": str(program), "out": str(tmp / "model.tflite"), "precision": precision,
                   "input_shape_nhwc": [1, chw[1], chw[2], chw[0]], "activations": activations}
        if precision == "int8":
            if calibration_nchw is None or len(calibration_nchw) == 0:
                raise StageError(stage, "int8 needs calibration images")
            np.save(tmp / "calib.npy", np.ascontiguousarray(np.asarray(calibration_nchw, np.float32)
                                                            .transpose(0, 2, 3, 1)))
            request["calibration"] = str(tmp / "calib.npy")
        (tmp / "request.json").write_text(json.dumps(request))
        try:
            proc = subprocess.run([env["python"], "-m", "edgekd.export.litert_worker", str(tmp / "request.json")],
                                  capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                                  env=envs.worker_env({"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}))
        except subprocess.TimeoutExpired:
            raise StageError(stage, f"{precision} conversion did not finish in "
                                    f"{WORKER_TIMEOUT_S} s") from None
        result = _last_json(proc.stdout)
        if proc.returncode != 0 or not result.get("ok"):
            why = result.get("error") or (f"worker died (signal {-proc.returncode})" if proc.returncode < 0 else
                                          (proc.stderr.strip().splitlines() or ["no output"])[-1][:300])
            raise StageError(stage, f"{precision} conversion: {why}")
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / "model.tflite"), str(out_path))
    seconds = round(time.perf_counter() - t0, 2)
    what = precision if precision == "fp32" else f"int8 ({activations} activations)"
    log(f"{CONVERTER} {what} -> {out_path.name} ({out_path.stat().st_size / 1024:.1f} KiB, NHWC input, "
        f"static batch 1, {mode} torch.export, {seconds:.1f} s)")
    return {"converter": CONVERTER, "versions": result.get("versions", {}), "seconds": seconds, "export": mode,
            "static_batch": 1, **({"activations": activations} if precision == "int8" else {})}


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {}
