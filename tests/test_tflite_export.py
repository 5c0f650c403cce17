"""ONNX -> TFLite (fp32 + int8) export and the TFLite runner, on a small CNN trained on sklearn digits.

One conversion is shared by the module (TensorFlow import + onnx2tf + int8 take ~10 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx2tf")
pytest.importorskip("ai_edge_litert")
ort = pytest.importorskip("onnxruntime")

from edgekd.errors import StageError  # noqa: E402
from edgekd.export.tflite import convert_onnx_to_tflite  # noqa: E402
from edgekd.runtimes.tflite_runner import TFLiteRunner  # noqa: E402

N_TRAIN = 1500


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _NetworkBlocked(RuntimeError):
    pass


def _no_network(*args, **kwargs):
    raise _NetworkBlocked("network access attempted during TFLite conversion")


def _block_network(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(socket.socket, "connect", _no_network)
    mp.setattr(socket.socket, "connect_ex", _no_network)
    mp.setattr(socket, "create_connection", _no_network)
    mp.setattr(socket, "getaddrinfo", _no_network)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (N,1,8,8) in [0,1]
    return x, d.target.astype(np.int64)


def _small_cnn(in_ch: int, hw: int) -> "torch.nn.Module":
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(in_ch, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * (hw // 2) ** 2, 10),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    x, y = _digits()
    xtr, ytr = torch.from_numpy(x[:N_TRAIN]), torch.from_numpy(y[:N_TRAIN])
    model = _small_cnn(1, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        perm = torch.randperm(N_TRAIN)
        for i in range(0, N_TRAIN, 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()

    d = tmp_path_factory.mktemp("tflite_export")
    onnx_path = d / "student.onnx"
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (xtr[:2],), str(onnx_path), dynamo=True, external_data=False,
                      dynamic_shapes=({0: batch},), input_names=["input"], output_names=["logits"])
    before = _sha256(onnx_path)

    logs: list[str] = []
    rec_before = sys.getrecursionlimit()
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        t0 = time.perf_counter()
        paths = convert_onnx_to_tflite(onnx_path, d / "out", x[:200], log=logs.append)
        seconds = time.perf_counter() - t0
    return {
        "onnx": onnx_path, "hash_before": before, "paths": paths, "logs": logs, "seconds": seconds,
        "x_eval": x[N_TRAIN:N_TRAIN + 200], "y_eval": y[N_TRAIN:N_TRAIN + 200],
        "rec_before": rec_before, "rec_after": sys.getrecursionlimit(),
    }


def _ort_logits(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_outputs_and_input_untouched(exported):
    paths = exported["paths"]
    assert set(paths) == {"fp32", "int8"}
    assert paths["fp32"].name == "student_fp32.tflite" and paths["int8"].name == "student_int8.tflite"
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert _sha256(exported["onnx"]) == exported["hash_before"], "onnx2tf modified the input ONNX file"
    # onnx2tf sets sys.setrecursionlimit(2**31 - 1) on import; it must not leak out of the export.
    assert exported["rec_after"] == exported["rec_before"]
    # quiet: a short summary only
    assert 1 <= len(exported["logs"]) <= 5, exported["logs"]
    print(f"\nconversion {exported['seconds']:.1f}s; log: {exported['logs']}")


def test_fp32_matches_onnxruntime(exported):
    x = exported["x_eval"]
    ref = _ort_logits(exported["onnx"], x)
    runner = TFLiteRunner(exported["paths"]["fp32"])
    assert runner.input_dtype == np.float32
    got = runner.predict(x)
    assert got.shape == ref.shape == (len(x), 10) and got.dtype == np.float32
    diff = float(np.max(np.abs(got - ref)))
    print(f"\nfp32 max abs diff vs ORT: {diff:.2e}")
    assert diff < 1e-3


def test_int8_agreement_and_accuracy(exported):
    x, y = exported["x_eval"], exported["y_eval"]
    ref = _ort_logits(exported["onnx"], x)
    runner = TFLiteRunner(exported["paths"]["int8"])
    assert runner.input_dtype == np.int8
    q = runner.predict(x)
    assert q.shape == ref.shape and q.dtype == np.float32
    agree = float(np.mean(q.argmax(1) == ref.argmax(1)))
    acc_fp32 = float(np.mean(ref.argmax(1) == y))
    acc_int8 = float(np.mean(q.argmax(1) == y))
    print(f"\nint8 top-1 agreement {agree:.3f}; acc fp32 {acc_fp32:.3f} int8 {acc_int8:.3f}")
    assert acc_fp32 > 0.8, "the test model did not train"
    assert agree >= 0.95
    assert acc_int8 >= acc_fp32 - 0.03


@pytest.mark.parametrize("kind", ["fp32", "int8"])
@pytest.mark.parametrize("batch", [1, 37])
def test_runner_batch_sizes(exported, kind, batch):
    x = exported["x_eval"][:100]  # 100 = 2*37 + 26: exercises a short last chunk
    runner = TFLiteRunner(exported["paths"][kind], num_threads=1)
    full = runner.predict(x, batch_size=256)
    chunked = runner.predict(x, batch_size=batch)
    assert chunked.shape == (100, 10)
    tol = 1e-4 if kind == "fp32" else 1e-6  # int8 is exact per sample; fp32 may differ by kernel blocking
    np.testing.assert_allclose(chunked, full, atol=tol)
    # prepare/run_raw path used by the latency benchmark
    prepared = runner.prepare(x[:batch])
    assert prepared.shape == (batch, 8, 8, 1) and prepared.dtype == runner.input_dtype
    raw = runner.run_raw(prepared)
    assert raw.shape == (batch, 10)
    if kind == "int8":
        assert raw.dtype == np.int8
    else:
        np.testing.assert_allclose(raw, full[:batch], atol=tol)


def test_loading_keeps_stderr_quiet(exported):
    """LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate" banner is kept off stderr (where edgekd's errors are
    one line); the runner still loads with XNNPACK. A fresh process: the banner is printed once per process."""
    code = ("import sys; import numpy as np; from edgekd.runtimes.tflite_runner import TFLiteRunner; "
            "r = TFLiteRunner(sys.argv[1]); r.predict(np.zeros((2, 1, 8, 8), np.float32)); "
            "print('after', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, str(exported["paths"]["int8"])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "after\n"  # nothing else: no banner; what the program itself writes still shows


def test_static_rgb_batch1_converts_offline(tmp_path):
    """The input that makes onnx2tf download sample images (static 4-D, 3 channels, batch <= 20)."""
    torch.manual_seed(0)
    model = _small_cnn(3, 16).eval()
    onnx_path = tmp_path / "rgb_static.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 16, 16),), str(onnx_path), dynamo=True, external_data=False)
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        paths = convert_onnx_to_tflite(onnx_path, tmp_path / "out", None, log=logs.append)
    assert set(paths) == {"fp32"}
    x = np.random.default_rng(1).random((5, 3, 16, 16), dtype=np.float32)
    got = TFLiteRunner(paths["fp32"]).predict(x)  # fixed-batch model: looped per sample
    ref = np.concatenate([_ort_logits(onnx_path, x[i:i + 1]) for i in range(5)])
    assert float(np.max(np.abs(got - ref))) < 1e-3


def test_quantized_onnx_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])],
        initializer=[helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                     helper.make_tensor("z", TensorProto.INT8, [], [0])],
    )
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(StageError, match="already quantized"):
        convert_onnx_to_tflite(path, tmp_path / "out", None, log=lambda _m: None)


def test_bad_calibration_shape_is_a_stage_error(exported, tmp_path):
    with pytest.raises(StageError, match="calibration data shape"):
        convert_onnx_to_tflite(exported["onnx"], tmp_path / "out", np.zeros((4, 3, 8, 8), np.float32),
                               log=lambda _m: None)
