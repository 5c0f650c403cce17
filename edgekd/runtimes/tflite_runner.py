"""Run a .tflite classifier with ai_edge_litert (no TensorFlow import).

Models produced by edgekd's TFLite routes take NHWC input and output logits (N, classes). Their input and output
tensors are float32 or int8 with (scale, zero_point): onnx2tf's int8 files are int8 at both ends, litert-torch's
full-integer ones take float input and give int8 output, its dynamic-activation ones are float at both ends. The runner takes NCHW float32 in [0,1] like every
other edgekd runtime and hides layout, dtype and batch handling.

Batch handling: onnx2tf's files keep the batch dim dynamic (shape_signature[0] == -1); the runner resizes the input
tensor to the requested chunk size (resize_tensor_input + allocate_tensors, only when the size changes).
litert-torch's files have a fixed batch (shape_signature[0] == B, B = 1): they run in chunks of B, the last padded.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgekd.errors import StageError, first_line


class TFLiteRunner:
    """Runs a .tflite file with ai_edge_litert's Interpreter (XNNPACK on by default)."""

    def __init__(self, path: str | Path, num_threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.num_threads = int(num_threads)
        try:
            with _without_litert_banner():
                self._interp = Interpreter(model_path=str(self.path), num_threads=self.num_threads)
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise StageError("tflite_runtime", f"cannot load {self.path.name}: {first_line(exc)}") from None

        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise StageError("tflite_runtime",
                             f"{self.path.name}: expected 1 input and 1 output, got {len(inputs)} and {len(outputs)}")
        self._in = inputs[0]
        self._out = outputs[0]
        self._in_index = int(self._in["index"])
        self._out_index = int(self._out["index"])
        self.input_dtype: np.dtype = np.dtype(self._in["dtype"])
        self.output_dtype: np.dtype = np.dtype(self._out["dtype"])
        if self.input_dtype not in (np.dtype(np.float32), np.dtype(np.int8)):
            raise StageError("tflite_runtime", f"{self.path.name}: unsupported input dtype {self.input_dtype}")

        sig = np.asarray(self._in.get("shape_signature", self._in["shape"]))
        shape = np.asarray(self._in["shape"])
        if len(shape) != 4:
            raise StageError("tflite_runtime", f"{self.path.name}: expected a 4-D NHWC input, got shape {shape.tolist()}")
        self.input_shape_nhwc: tuple[int, int, int, int] = tuple(int(s) for s in shape)  # current (allocated) shape
        self.dynamic_batch: bool = int(sig[0]) == -1
        # Batch the model currently holds (after allocate_tensors); a fixed-batch model never changes it.
        self.model_batch: int = int(shape[0])

        self._in_scale, self._in_zp = self._quant_params(self._in)
        self._out_scale, self._out_zp = self._quant_params(self._out)

    # -- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _quant_params(detail: dict) -> tuple[float, int]:
        scale, zp = detail.get("quantization", (0.0, 0))
        return float(scale), int(zp)

    def _ensure_batch(self, n: int) -> None:
        """Resize a dynamic-batch model to batch n (no-op if already n)."""
        if n == self.model_batch:
            return
        if not self.dynamic_batch:
            raise ValueError(f"model has a fixed batch of {self.model_batch}; cannot run batch {n}")
        _, h, w, c = self.input_shape_nhwc
        self._interp.resize_tensor_input(self._in_index, [n, h, w, c], strict=True)
        self._interp.allocate_tensors()
        self.model_batch = n
        self.input_shape_nhwc = (n, h, w, c)

    def _check_nchw(self, x_nchw: np.ndarray) -> np.ndarray:
        x = np.asarray(x_nchw)
        _, h, w, c = self.input_shape_nhwc
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"expected NCHW input (N, {c}, {h}, {w}), got {tuple(x.shape)}")
        return x

    def _quantize_input(self, x_nhwc: np.ndarray) -> np.ndarray:
        if self.input_dtype == np.int8:
            if self._in_scale == 0.0:
                raise StageError("tflite_runtime", f"{self.path.name}: int8 input without quantization scale")
            q = np.round(x_nhwc.astype(np.float32) / self._in_scale) + self._in_zp
            return np.clip(q, -128, 127).astype(np.int8)
        return np.ascontiguousarray(x_nhwc, dtype=np.float32)

    def _dequantize_output(self, y: np.ndarray) -> np.ndarray:
        if np.issubdtype(y.dtype, np.integer):
            if self._out_scale == 0.0:
                raise StageError("tflite_runtime", f"{self.path.name}: integer output without quantization scale")
            return (y.astype(np.float32) - self._out_zp) * self._out_scale
        return y.astype(np.float32, copy=False)

    # -- public API ------------------------------------------------------------------------------------------
    def prepare(self, x_nchw: np.ndarray) -> np.ndarray:
        """NCHW float in [0,1] -> NHWC in the model's input dtype (quantized for int8 models), for `run_raw`.

        Also resizes a dynamic-batch model to len(x) so `run_raw` can run it as is. For a fixed-batch model the
        batch must equal `model_batch`.
        """
        x = self._check_nchw(x_nchw)
        n = x.shape[0]
        if self.dynamic_batch:
            self._ensure_batch(n)
        elif n != self.model_batch:
            raise ValueError(f"fixed-batch model: prepare() needs exactly {self.model_batch} samples, got {n}")
        return np.ascontiguousarray(self._quantize_input(x.transpose(0, 2, 3, 1)))

    def run_raw(self, x_model_layout: np.ndarray) -> np.ndarray:
        """One invoke on an already-prepared input (NHWC, model dtype, model batch); returns the raw output
        tensor (int8 for int8 models, not dequantized)."""
        self._interp.set_tensor(self._in_index, x_model_layout)
        self._interp.invoke()
        return self._interp.get_tensor(self._out_index)

    def predict(self, x_nchw: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """x_nchw float32 (N,C,H,W) in [0,1] -> float32 logits (N, classes)."""
        x = self._check_nchw(x_nchw)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0,) + tuple(int(s) for s in self._out["shape"][1:]), dtype=np.float32)
        chunk = max(1, int(batch_size)) if self.dynamic_batch else self.model_batch
        outs = []
        for start in range(0, n, chunk):
            xb = x[start:start + chunk]
            m = xb.shape[0]
            if self.dynamic_batch:
                self._ensure_batch(m)
            elif m < chunk:  # pad the last chunk of a fixed-batch model
                pad = np.zeros((chunk - m,) + xb.shape[1:], dtype=xb.dtype)
                xb = np.concatenate([xb, pad], axis=0)
            xin = np.ascontiguousarray(self._quantize_input(xb.transpose(0, 2, 3, 1)))
            y = self.run_raw(xin)
            outs.append(self._dequantize_output(y[:m]))
        return np.concatenate(outs, axis=0)


_BANNER = "INFO: Created TensorFlow Lite XNNPACK delegate"


@contextlib.contextmanager
def _without_litert_banner():
    """LiteRT's C++ core prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on file descriptor 2 when
    an interpreter is made: noise in a command whose errors are one line on stderr. Whatever else it prints there
    (a real warning or error) is passed on."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr replaced by a stream without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            rest = [ln for ln in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not ln.startswith(_BANNER)]
            if rest:
                sys.stderr.write("".join(rest))
                sys.stderr.flush()


def check_loads_without_tensorflow(path: str | Path, stage: str) -> None:
    """Fail `stage` unless the .tflite file loads in LiteRT alone, as an app on a device loads it.

    The check runs in a fresh process: in the build's own process TensorFlow is imported, which links its Select
    ("Flex") ops into the interpreter, so a file that needs them (onnx2tf writes `FlexErf` for GELU's erf) loads
    there and nowhere else; and a file XNNPACK cannot prepare can abort the whole process."""
    import os
    import re
    import subprocess
    import sys

    path = Path(path)
    proc = subprocess.run([sys.executable, "-c", "import sys; from edgekd.runtimes.tflite_runner import TFLiteRunner; "
                           "TFLiteRunner(sys.argv[1])", str(path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if proc.returncode == 0:
        return
    flex = sorted({m.decode() for m in re.findall(rb"Flex[A-Z][A-Za-z0-9]+", path.read_bytes())})
    if flex:
        why = f"it needs TensorFlow Select ops ({', '.join(flex)}), which LiteRT on a device does not have"
    elif proc.returncode < 0:
        why = f"LiteRT crashed loading it (signal {-proc.returncode})"
    else:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        why = last.split(": ", 1)[-1][:240]
    raise StageError(stage, f"{path.name} does not load in LiteRT without TensorFlow: {why}")
