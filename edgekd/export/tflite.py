"""ONNX (float) -> TFLite fp32 + full-integer int8, via onnx2tf 1.29.24 and TF's own quantizer.

Traps of onnx2tf 1.29.24 (see /work/shared/STACK.md) and how this module guards each; all checked by
tests/test_tflite_export.py and by reading onnx2tf/onnx2tf.py:
1. Sample-image download (static 4-D 3-channel input, batch <= 20, and onnx2tf's own int8 calibration):
   `onnx2tf.onnx2tf.download_test_image_data` is replaced, for the duration of the call, by a local provider
   (the caller's calibration images, else seeded uniform noise) that never touches the network; onnx2tf's
   int8 path is never enabled. Verified: a static 1x3x16x16 model raised ConnectionError under onnx2tf alone
   with sockets blocked, and converts offline here (the test blocks socket.connect/getaddrinfo).
2. `batch_size=1` / `-b 1` silently breaks models: batch_size / overwrite_input_shape are never passed; the
   batch stays dynamic: SavedModel signature (None, H, W, C), and both .tflite files have
   shape_signature[0] == -1, so TFLiteRunner resizes (tested at batch 1 and 37, fp32 and int8).
3. onnx2tf rewrites its input .onnx in place (onnxsim + op renaming): it only ever sees a copy, written with
   onnx.save into a private temp dir (this also inlines external .onnx.data weights). Verified by hash.
4. QDQ/quantized ONNX converts to a silently wrong model: inputs containing QuantizeLinear/DequantizeLinear/
   QLinear*/*Integer ops are refused; int8 is made by tf.lite.TFLiteConverter.from_saved_model with a
   representative_dataset from the caller's float calibration images (NHWC, batch 1). Tested: QDQ refused.
5. Negative or unsorted axes of a Reduce* op (ReduceMean axes [-1, -2], as timm's global pooling exports; [3, 2]
   fails too) convert to a model whose output loses the batch (TFLite (1, K) for an ONNX (8, K)): they are
   rewritten as sorted positive axes on the private copy first (`_positive_reduce_axes`; the reduction is the
   same). Seen with timm:test_efficientnet; [2, 3] converts correctly.
Every export ends with a parity check: fp32 TFLite vs onnxruntime on real inputs (raises if broken), int8
top-1 agreement logged. Also found while reading the source: onnx2tf calls the `onnxsim` executable from
PATH (silently skipped when the venv is not activated -> we put sys.executable's dir first), and importing
or running it mutates process state (recursion limit 2**31-1, global warning filters, random seeds, env vars
such as CUDA_VISIBLE_DEVICES=-1); all of these are restored afterwards. Its `error()` paths call sys.exit(1)
and a failed SavedModel write is only logged, so SystemExit is caught and the outputs are checked to exist.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgekd.errors import StageError, first_line

STAGE = "export_tflite"
MAX_CALIBRATION_SAMPLES = 1000  # representative_dataset size cap (evenly spaced subset beyond this)
PARITY_SAMPLES = 64  # samples used for the post-export ORT-vs-TFLite check
FP32_PARITY_RTOL = 5e-3  # fail if max|tflite - ort| > rtol * max(1, max|ort|)

_QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QGemm", "ConvInteger", "MatMulInteger",
}
_ENV_KEYS = ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS", "CUDA_VISIBLE_DEVICES", "PATH")


class _MissingOutput(RuntimeError):
    """onnx2tf returned but did not write an expected file (some of its failures are only logged)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, ModuleNotFoundError) and getattr(exc, "name", "").startswith("onnx2tf.ops."):
        return f"ONNX op type {exc.name.rsplit('.', 1)[1]} is not implemented in onnx2tf"
    m = re.search(r"'(tfl?\.\w+)' op ([^\n]*)", text)  # MLIR converter errors name the failing TF/TFLite op
    if m:
        return f"{type(exc).__name__}: op {m.group(1)} {m.group(2).strip()}"[:300]
    first = first_line(exc, default="")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextlib.contextmanager
def _captured_fds(log_path: Path) -> Iterator[Path]:
    """Send everything written to fd 1/2 (Python prints, TF/absl C++ logs, subprocesses) to log_path."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        with contextlib.redirect_stdout(sys.__stdout__ or sys.stdout), \
                contextlib.redirect_stderr(sys.__stderr__ or sys.stderr):
            yield log_path
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)


@contextlib.contextmanager
def _restored_process_state() -> Iterator[None]:
    """Undo the process-global changes onnx2tf makes on import and during convert()."""
    rec = sys.getrecursionlimit()
    filters = list(warnings.filters)
    py_state = random.getstate()
    np_state = np.random.get_state()
    env = {k: os.environ.get(k) for k in _ENV_KEYS}
    try:
        yield
    finally:
        sys.setrecursionlimit(rec)
        warnings.filters[:] = filters
        if hasattr(warnings, "_filters_mutated"):
            warnings._filters_mutated()  # type: ignore[attr-defined]
        random.setstate(py_state)
        np.random.set_state(np_state)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _log_tail(path: Path | None, n: int = 3) -> str:
    if path is None:
        return ""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    # skip TF/absl housekeeping noise
    lines = [ln for ln in lines if not ln.startswith(("W0000", "I0000", "E0000", "WARNING: All log messages"))]
    return " | ".join(lines[-n:])[:300]


def _inspect_onnx(onnx_path: Path):
    """Load the model (with external data), refuse quantized graphs, return (model, input name, (C,H,W))."""
    import onnx

    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # noqa: BLE001
        raise StageError(STAGE, f"cannot read {onnx_path.name}: {_one_line(exc)}") from None
    quant = sorted({n.op_type for n in model.graph.node if n.op_type in _QUANTIZED_OPS})
    if quant:
        raise StageError(STAGE, f"{onnx_path.name} is already quantized ({', '.join(quant)}); onnx2tf turns QDQ "
                                "graphs into wrong models - export the float model and let TFLite quantize it")
    init_names = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise StageError(STAGE, f"{onnx_path.name} has {len(inputs)} inputs; only single-image-input models are supported")
    inp = inputs[0]
    tt = inp.type.tensor_type
    if tt.elem_type != onnx.TensorProto.FLOAT:
        raise StageError(STAGE, f"input '{inp.name}' is {onnx.TensorProto.DataType.Name(tt.elem_type)}, not FLOAT")
    dims = list(tt.shape.dim)
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]):
        raise StageError(STAGE, f"input '{inp.name}' must be NCHW with static C,H,W")
    chw = tuple(int(d.dim_value) for d in dims[1:])
    # A static batch works (trap 1 is guarded) but the TFLite models then have that fixed batch too.
    static_batch = int(dims[0].dim_value) if dims[0].HasField("dim_value") else None
    return model, static_batch, chw


def _positive_reduce_axes(model) -> None:
    """Trap 5: rewrite negative or unsorted Reduce* axes (attribute, or constant `axes` input since opset 18) as sorted
    positive ones, in place, using each op's input rank from shape inference. Ops of unknown rank are left alone."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in (*graph.input, *onnx.shape_inference.infer_shapes(model).graph.value_info)
             if v.type.tensor_type.HasField("shape")}
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if not node.op_type.startswith("Reduce") or node.input[0] not in ranks:
            continue
        rank = ranks[node.input[0]]
        for attr in node.attribute:
            if attr.name == "axes" and list(attr.ints) != sorted({a % rank for a in attr.ints}):
                attr.ints[:] = sorted({a % rank for a in attr.ints})
        if len(node.input) > 1 and node.input[1] in inits:
            axes = numpy_helper.to_array(inits[node.input[1]])
            fixed = np.array(sorted({int(a) % rank for a in axes.reshape(-1)}), dtype=axes.dtype)
            if axes.ndim == 1 and not np.array_equal(axes, fixed):
                # a new initializer: the original may be shared with ops of another rank
                name = f"{node.input[1]}_positive_{node.name or len(inits)}"
                graph.initializer.append(numpy_helper.from_array(fixed, name))
                inits[name] = graph.initializer[-1]
                node.input[1] = name


def _local_test_images(calib_nhwc: np.ndarray | None) -> Callable[[], np.ndarray]:
    """Replacement for onnx2tf's download_test_image_data: local data only, never the network."""

    def provide() -> np.ndarray:
        if calib_nhwc is not None and calib_nhwc.shape[-1] == 3 and len(calib_nhwc) >= 20:
            return np.ascontiguousarray(calib_nhwc[:20], dtype=np.float32)
        rng = np.random.default_rng(0)
        return rng.random((20, 128, 128, 3), dtype=np.float32)

    return provide


def _run_onnx2tf(work_onnx: Path, saved_model_dir: Path, calib_nhwc: np.ndarray | None) -> Path:
    """Run onnx2tf on work_onnx (a private copy). Returns the fp32 .tflite path inside saved_model_dir."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # what onnx2tf sets on first import; needed on later calls too
    # onnx2tf runs `onnxsim` as a subprocess found on PATH: make it this interpreter's onnxsim.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

    import onnx2tf  # noqa: F401  (heavy: imports TensorFlow)
    import onnx2tf.onnx2tf as o2t

    original = o2t.download_test_image_data
    o2t.download_test_image_data = _local_test_images(calib_nhwc)
    try:
        o2t.convert(
            input_onnx_file_path=str(work_onnx),
            output_folder_path=str(saved_model_dir),
            non_verbose=True,
            onnxruntime_output_memmap_dir=str(work_onnx.parent / "ort_memmap"),
            # deliberately NOT passed: batch_size, overwrite_input_shape (trap 2), output_integer_quantized_tflite
            # (its calibration would default to downloaded images; TF's converter is used instead).
        )
    finally:
        o2t.download_test_image_data = original
    fp32 = saved_model_dir / f"{work_onnx.stem}_float32.tflite"
    if not (saved_model_dir / "saved_model.pb").is_file():
        raise _MissingOutput("onnx2tf wrote no SavedModel")
    if not fp32.is_file():
        raise _MissingOutput("onnx2tf wrote no float32 .tflite")
    return fp32


def _quantize_int8(saved_model_dir: Path, calib_nhwc: np.ndarray) -> bytes:
    import tensorflow as tf

    def representative_dataset():
        for i in range(len(calib_nhwc)):
            yield [calib_nhwc[i:i + 1]]

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def _calibration_set(cal, chw: tuple, stage: str) -> np.ndarray:
    """Calibration images (N, C, H, W) checked against the model input (C, H, W), at most MAX_CALIBRATION_SAMPLES
    of them (evenly spaced), as contiguous float32."""
    cal = np.asarray(cal)
    if cal.ndim != 4 or tuple(cal.shape[1:]) != tuple(chw) or len(cal) == 0:
        raise StageError(stage, f"calibration data shape {cal.shape} does not match the model input (N, "
                                f"{', '.join(map(str, chw))})")
    if not np.all(np.isfinite(cal)):
        raise StageError(stage, "calibration data contains NaN/inf")
    if len(cal) > MAX_CALIBRATION_SAMPLES:
        cal = cal[np.linspace(0, len(cal) - 1, MAX_CALIBRATION_SAMPLES).astype(int)]
    return np.ascontiguousarray(cal, dtype=np.float32)


def quantize_saved_model_int8(saved_model_dir: Path, calibration_nchw: np.ndarray, out_path: Path,
                              stage: str = "quantize_tflite") -> Path:
    """Full-integer int8 TFLite (int8 input and output tensors) from a SavedModel onnx2tf wrote, with TF's converter
    and a representative dataset of calibration_nchw ((N, C, H, W) float32). Raises StageError(stage, ...)."""
    cal = np.asarray(calibration_nchw)
    chw = cal.shape[1:] if cal.ndim == 4 else (-1, -1, -1)  # (C, H, W): the SavedModel fixes them, not the caller
    calib_nhwc = np.ascontiguousarray(_calibration_set(cal, chw, stage).transpose(0, 2, 3, 1))
    with tempfile.TemporaryDirectory(prefix="edgekd_tflite_int8_") as tmp:
        captured: Path | None = None
        with _restored_process_state():  # TF's import and converter change process state, as onnx2tf does
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            os.environ["TF_USE_LEGACY_KERAS"] = "1"
            try:
                with _captured_fds(Path(tmp) / "convert.log") as captured:
                    data = _quantize_int8(Path(saved_model_dir), calib_nhwc)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - the converter's failure as one line
                detail = _one_line(exc) if not isinstance(exc, SystemExit) else (_log_tail(captured) or "exited")
                raise StageError(stage, f"{Path(out_path).name}: int8 quantization failed: {detail}") from None
    Path(out_path).write_bytes(data)
    return Path(out_path)


def _check_parity(onnx_path: Path, paths: dict[str, Path], samples_nchw: np.ndarray, static_batch: int | None,
                  log: Callable[[str], None]) -> None:
    import onnxruntime as ort

    from edgekd.runtimes.tflite_runner import TFLiteRunner

    def runner(path: Path) -> TFLiteRunner:
        try:
            return TFLiteRunner(path)
        except StageError as exc:  # e.g. the fp32 model needs Flex (SELECT_TF_OPS) kernels LiteRT does not ship
            raise StageError(STAGE, f"{path.name} does not run in LiteRT: {exc}") from None

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        if static_batch is not None:
            reps = -(-len(samples_nchw) // static_batch) * static_batch
            samples_nchw = np.resize(samples_nchw, (reps, *samples_nchw.shape[1:]))  # whole ORT batches
            ref = np.concatenate([sess.run(None, {name: samples_nchw[i:i + static_batch]})[0]
                                  for i in range(0, reps, static_batch)])
        else:
            ref = sess.run(None, {name: samples_nchw})[0]
    except Exception as exc:  # noqa: BLE001
        raise StageError(STAGE, f"parity check: onnxruntime cannot run {onnx_path.name}: {_one_line(exc)}") from None
    fp32 = runner(paths["fp32"]).predict(samples_nchw)
    if fp32.shape != ref.shape:
        raise StageError(STAGE, f"fp32 TFLite output shape {fp32.shape} != ONNX output shape {ref.shape}")
    diff = float(np.max(np.abs(fp32 - ref)))
    tol = FP32_PARITY_RTOL * max(1.0, float(np.max(np.abs(ref))))
    if not np.isfinite(diff) or diff > tol:
        raise StageError(STAGE, f"fp32 TFLite disagrees with ONNX: max abs diff {diff:.3g} > {tol:.3g} "
                                f"on {len(samples_nchw)} samples (broken conversion)")
    msg = f"parity vs onnxruntime on {len(samples_nchw)} samples: fp32 max abs diff {diff:.2e}"
    if "int8" in paths and ref.ndim == 2:
        q = runner(paths["int8"]).predict(samples_nchw)
        agree = float(np.mean(q.argmax(1) == ref.argmax(1)))
        msg += f", int8 top-1 agreement {agree:.3f}"
    log(msg)


def onnx2tf_versions() -> dict:
    import importlib.metadata as md

    return {d: md.version(d) for d in ("onnx2tf", "tensorflow", "ai-edge-litert")}


def convert_onnx_to_tflite(onnx_path: Path, out_dir: Path, calibration_nchw: np.ndarray | None,
                           *, fp32_name: str = "student_fp32.tflite", int8_name: str = "student_int8.tflite",
                           log: Callable[[str], None] = print,
                           saved_model_out: Path | None = None) -> dict[str, Path]:
    """Convert a float ONNX model (input NCHW float32 in [0,1], dynamic batch dim, output logits (N, classes)) to
    TFLite fp32 and, if calibration_nchw is given, full-integer int8 (int8 input and output tensors, TF's
    converter with a representative_dataset built from calibration_nchw). Returns {"fp32": path, "int8": path}.

    Both models take NHWC input and keep a dynamic batch (run them with edgekd.runtimes.tflite_runner).
    The input file is never modified and nothing is downloaded. Raises StageError("export_tflite", ...) on failure.
    `saved_model_out`: keep onnx2tf's SavedModel there (for `quantize_saved_model_int8` in a later stage).
    """
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir)
    if not onnx_path.is_file():
        raise StageError(STAGE, f"ONNX file not found: {onnx_path}")
    model, static_batch, chw = _inspect_onnx(onnx_path)
    if static_batch is not None:
        log(f"note: {onnx_path.name} has a static batch of {static_batch}; the TFLite models keep it "
            "(export with a dynamic batch dim for resizable models)")

    calib_nhwc = None
    if calibration_nchw is not None:
        calibration_nchw = _calibration_set(calibration_nchw, chw, STAGE)
        calib_nhwc = np.ascontiguousarray(calibration_nchw.transpose(0, 2, 3, 1))

    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Path] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekd_tflite_") as tmp:
        tmp_dir = Path(tmp)
        work_onnx = tmp_dir / "model.onnx"  # trap 3: onnx2tf rewrites this copy, never the caller's file
        import onnx

        _positive_reduce_axes(model)  # trap 5
        onnx.save(model, str(work_onnx))
        del model
        saved_model_dir = tmp_dir / "saved_model"

        step = f"{fp32_name}: onnx2tf conversion of {onnx_path.name}"
        captured: Path | None = None
        with _restored_process_state():
            try:
                with _captured_fds(tmp_dir / "convert.log") as captured:
                    fp32_tmp = _run_onnx2tf(work_onnx, saved_model_dir, calib_nhwc)
                    t1 = time.perf_counter()
                    int8_bytes = None
                    if calib_nhwc is not None:
                        step = f"{int8_name}: int8 quantization"
                        int8_bytes = _quantize_int8(saved_model_dir, calib_nhwc)
            except StageError:
                raise
            except (Exception, SystemExit) as exc:  # onnx2tf's error paths call sys.exit(1)
                op = getattr(exc, "onnx_op_name", None)
                where = f" at ONNX op '{op}'" if op else ""
                detail = _one_line(exc)
                if isinstance(exc, SystemExit):
                    detail = _log_tail(captured) or "onnx2tf exited"
                elif isinstance(exc, _MissingOutput):
                    tail = _log_tail(captured)
                    detail = f"{exc}" + (f" ({tail})" if tail else "")
                raise StageError(STAGE, f"{step} failed{where}: {detail}") from None

        if saved_model_out is not None:  # the SavedModel alone, not onnx2tf's other .tflite files
            Path(saved_model_out).mkdir(parents=True, exist_ok=True)
            for part in saved_model_dir.iterdir():
                if part.name in ("saved_model.pb", "fingerprint.pb", "variables", "assets"):
                    (shutil.copytree if part.is_dir() else shutil.copyfile)(part, Path(saved_model_out) / part.name)
        fp32_out = out_dir / fp32_name
        shutil.copyfile(fp32_tmp, fp32_out)
        results["fp32"] = fp32_out
        log(f"onnx2tf -> {fp32_out.name} ({fp32_out.stat().st_size / 1024:.1f} KiB, NHWC input, "
            f"{t1 - t0:.1f}s)")
        if int8_bytes is not None:
            int8_out = out_dir / int8_name
            int8_out.write_bytes(int8_bytes)
            results["int8"] = int8_out
            log(f"int8 (full-integer, {len(calib_nhwc)} calibration samples) -> {int8_out.name} "
                f"({len(int8_bytes) / 1024:.1f} KiB, {time.perf_counter() - t1:.1f}s)")

    # Parity on real inputs when available (catches traps 2 and 4 style silent breakage).
    if calibration_nchw is not None:  # evenly spaced: calibration sets are often sorted by class
        n = len(calibration_nchw)
        samples = calibration_nchw[np.linspace(0, n - 1, min(n, PARITY_SAMPLES)).astype(int)]
    else:
        samples = np.random.default_rng(0).random((8, *chw), dtype=np.float32)
    _check_parity(onnx_path, results, samples, static_batch, log)
    return results
