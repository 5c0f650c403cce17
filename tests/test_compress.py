"""Compression end to end on digits: structured pruning + KD recovery, and QAT with KD ending in int8 ONNX/TFLite.

pipelines/digits-compress.yaml shares digits.yaml's data/teacher/student/distill sections, so it is built on a copy
of the session's digits build: only prune, qat and what depends on them run here.
"""

import json
import shutil
import tempfile

import numpy as np
import onnx
import pytest
import torch

from conftest import REPO, read_report, run_cli, stage_statuses, write_pipeline

COMPRESS = REPO / "pipelines" / "digits-compress.yaml"


@pytest.fixture(scope="module")
def compress_run(digits_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("compress") / "run"
    shutil.copytree(digits_run, run_dir)
    proc = run_cli("build", "--target", "android-arm64", "--pipeline", COMPRESS, "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return run_dir


def _splits(run_dir):
    from edgekd.data.datasets import Splits

    return Splits.load(run_dir / "stages/data/splits.npz")


@pytest.mark.slow
def test_prune_cuts_params_and_macs_and_recovers_accuracy(compress_run):
    r = read_report(compress_run)
    statuses = stage_statuses(r)
    assert statuses["data"] == statuses["teacher"] == statuses["distill"] == "cached"
    assert statuses["prune"] == statuses["qat"] == "ran" and statuses["export_tflite"] == "skipped"
    p = r["compression"]["prune"]
    distilled = json.loads((compress_run / "stages/distill/manifest.json").read_text())["data"]
    assert p["params_before"] == distilled["params"]
    assert p["params_after"] <= 0.30 * p["params_before"] and p["macs_after"] <= 0.35 * p["macs_before"]
    assert p["layers"]["1.classifier"] == "Linear out 10 (kept), in 32->16"  # the classes are protected
    assert p["layers"]["1.features.0.0"] == "Conv2d out 8->4"
    # recovery by KD brings the pruned student back near the unpruned one (359 test images: 1 image = 0.28 pt)
    assert p["test_accuracy_before"] > 0.9
    assert p["test_accuracy_after_recovery"] >= p["test_accuracy_before"] - 0.04
    assert p["test_accuracy_after_recovery"] > p["test_accuracy_after_pruning"]
    # downstream stages work on the pruned student: the report's student, the fp32 ONNX file's weights
    assert r["student"]["params"] == p["params_after"]
    onnx_model = onnx.load(str(compress_run / "stages/export_onnx/student_fp32.onnx"))
    weights = sum(int(np.prod(i.dims)) for i in onnx_model.graph.initializer if len(i.dims) >= 1)
    assert weights <= p["params_after"] < p["params_before"] // 3  # BN folded into the convs: fewer numbers
    fp32 = next(a for a in r["artifacts"] if a["name"] == "student_fp32.onnx")
    assert abs(fp32["accuracy"] - p["test_accuracy_after_recovery"]) < 1e-9
    md = (compress_run / "report.md").read_text()
    assert "pruning (50% of the channels, classifier kept)" in md and "after 15 epochs of KD recovery" in md


@pytest.mark.slow
def test_pruned_student_is_stored_as_state_dict_and_shapes(compress_run):
    from edgekd.compress.pruning import load_pruned
    from edgekd.config import load_pipeline
    from edgekd.models.zoo import count_params, model_from_config
    from edgekd.runtimes.ort_runner import OrtRunner

    cfg, splits = load_pipeline(COMPRESS), _splits(compress_run)
    stage = compress_run / "stages/prune"
    shapes = json.loads((stage / "student_shapes.json").read_text())
    assert shapes["1.features.0.0"] == {"type": "Conv2d", "in": 1, "out": 4, "groups": 1}
    assert shapes["1.classifier"] == {"type": "Linear", "in": 16, "out": 10}
    state = torch.load(stage / "student.pt", weights_only=True)  # tensors only, no pickled module
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model = load_pruned(model_from_config(cfg.student, splits.input_shape, splits.num_classes), shapes,
                        stage / "student.pt")
    assert count_params(model) == read_report(compress_run)["compression"]["prune"]["params_after"]
    with torch.no_grad():
        ref = model(torch.from_numpy(splits.x_test[:])).numpy()
    out = OrtRunner(compress_run / "stages/export_onnx/student_fp32.onnx").predict(splits.x_test)
    assert np.abs(out - ref).max() < 1e-4
    with pytest.raises(ValueError, match="do not fit"):
        load_pruned(model_from_config(cfg.teacher, splits.input_shape, splits.num_classes), {"x": {}},
                    stage / "student.pt")


@pytest.mark.slow
def test_qat_int8_onnx_runs_integer_kernels_and_matches_torch(compress_run):
    from edgekd.runtimes.ort_runner import OrtRunner, optimized_op_types

    r = read_report(compress_run)
    q = r["compression"]["qat"]
    assert q["pruned"] is True and q["scheme"] == {"activation_type": "int8", "per_channel": True,
                                                    "reduce_range": False,
                                                    "weights": "symmetric int8 per output channel"}
    # onnxruntime's integer kernels vs the PyTorch converted model on the same test split: 359 images here, so
    # 0.2 points is less than one image; allow at most one image of difference (Fashion-MNIST: see README)
    assert abs(q["test_accuracy_onnxruntime"] - q["test_accuracy_torch_converted"]) <= 1 / 359 + 1e-9
    assert q["onnxruntime_vs_torch_top1_agreement"] >= 0.99
    assert q["test_accuracy_onnxruntime"] > 0.9
    path = compress_run / "stages/qat/student_qat_int8.onnx"
    splits = _splits(compress_run)
    acc = float((OrtRunner(path).predict(splits.x_test).argmax(1) == splits.y_test).mean())
    assert acc == q["test_accuracy_onnxruntime"]
    stored = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= stored
    assert "BatchNormalization" not in stored  # folded into the int8 convs
    with tempfile.TemporaryDirectory() as tmp:
        ran = set(optimized_op_types(path, tmp))  # what ORT runs after its graph optimizations
    assert {"QLinearConv", "QGemm"} <= ran, ran
    assert not ran & {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "NchwcConv"}, ran


@pytest.mark.slow
def test_qat_tflite_agrees_with_qat_onnx_and_report_lists_ptq_and_qat(compress_run):
    from edgekd.runtimes.ort_runner import OrtRunner
    from edgekd.runtimes.tflite_runner import TFLiteRunner

    r = read_report(compress_run)
    arts = {a["name"]: a for a in r["artifacts"]}
    assert {"student_int8.onnx", "student_qat_int8.onnx", "student_qat_int8.tflite"} <= set(arts)
    assert arts["student_qat_int8.tflite"]["format"] == "tflite" and arts["student_qat_int8.tflite"]["latency_ms"]
    int8 = r["compression"]["int8_accuracy"]
    assert set(int8["post_training"]) == {"student_int8.onnx"}
    assert set(int8["qat"]) == {"student_qat_int8.onnx", "student_qat_int8.tflite"}
    assert all(v > 0.9 for v in (*int8["post_training"].values(), *int8["qat"].values()))
    splits = _splits(compress_run)
    stage = compress_run / "stages/qat"
    interp = TFLiteRunner(stage / "student_qat_int8.tflite")
    assert interp.input_dtype == np.int8  # full-integer model
    got = interp.predict(splits.x_test)
    ref = OrtRunner(stage / "student_qat_int8.onnx").predict(splits.x_test)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97
    assert abs(arts["student_qat_int8.tflite"]["accuracy"] - arts["student_qat_int8.onnx"]["accuracy"]) <= 0.01
    assert r["compression"]["qat"]["tflite"]["agreement_vs_qat_onnx"] >= 0.97
    md = (compress_run / "report.md").read_text()
    assert "QAT (4 epochs, KD on" in md and "`student_int8.onnx`" in md and "`student_qat_int8.tflite`" in md


@pytest.mark.slow
def test_target_macs_prunes_to_the_budget(compress_run, tmp_path):
    p = read_report(compress_run)["compression"]["prune"]
    target = int(p["macs_before"] * 0.5)
    pipeline = write_pipeline(tmp_path / "macs.yaml", base=COMPRESS, name="digits-compress",
                              prune={"ratio": None, "target_macs": target}, qat={"enabled": False})
    run_dir = tmp_path / "run"
    shutil.copytree(compress_run, run_dir)
    proc = run_cli("build", "--pipeline", pipeline, "--run-dir", run_dir, "--only", "prune")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    data = json.loads((run_dir / "stages/prune/manifest.json").read_text())["data"]
    assert data["macs_after"] <= target and 0 < data["ratio"] < 0.5
    assert data["test_accuracy_after_recovery"] > 0.85


@pytest.mark.slow
def test_layer_ratios_and_round_to_set_the_kept_channels(compress_run, tmp_path):
    from edgekd.models.zoo import build_model, count_params

    # digits student: conv 8 -> conv 16 -> dense 32. The first conv loses 75% (keeps int(8 * 0.25) = 2), the others
    # 40%, rounded down to even counts: conv 16 keeps int(9.6) = 9 -> 8, dense 32 keeps int(19.2) = 19 -> 18.
    pipeline = write_pipeline(tmp_path / "layers.yaml", base=COMPRESS, name="digits-compress", qat={"enabled": False},
                              prune={"ratio": 0.4, "layer_ratios": {"features.0.0": 0.75}, "round_to": 2})
    run_dir = tmp_path / "run"
    shutil.copytree(compress_run, run_dir)
    proc = run_cli("build", "--pipeline", pipeline, "--run-dir", run_dir, "--only", "prune")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    data = json.loads((run_dir / "stages/prune/manifest.json").read_text())["data"]
    assert data["layers"]["1.features.0.0"] == "Conv2d out 8->2"
    assert data["layers"]["1.features.2.0"] == "Conv2d out 16->8, in 8->2"
    assert data["layers"]["1.hidden.0"].startswith("Linear out 32->18")
    assert data["layer_ratios"] == {"features.0.0": 0.75} and data["round_to"] == 2
    same = build_model("cnn", {"channels": (2, 8), "hidden": 18, "dropout": 0.0}, (1, 8, 8), 10)
    assert data["params_after"] == count_params(same) < data["params_before"] * 0.3
    assert data["test_accuracy_after_recovery"] > 0.85  # 2 first-layer filters still read digits after KD
    # a layer that is not in the student: a one-line error naming the prunable ones, non-zero exit
    bad = write_pipeline(tmp_path / "bad.yaml", base=COMPRESS, name="digits-compress", qat={"enabled": False},
                         prune={"ratio": 0.5, "layer_ratios": {"features.9": 0.5}})
    proc = run_cli("build", "--pipeline", bad, "--run-dir", run_dir, "--only", "prune")
    assert proc.returncode != 0 and "'features.9' matches no prunable layer (prunable: 1.features.0.0, " \
        "1.features.2.0, 1.hidden.0)" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr


def test_compress_config_is_validated(tmp_path):
    from edgekd.config import load_pipeline
    from edgekd.errors import ConfigError

    cfg = load_pipeline(REPO / "pipelines" / "digits.yaml")
    assert cfg.prune.enabled is False and cfg.qat.enabled is False  # off unless the pipeline turns them on
    for sections, message in (
            ({"prune": {"enabled": True, "ratio": 1.0}}, "prune.ratio: must be in [0, 1)"),
            ({"prune": {"enabled": True}}, "give either ratio or target_macs"),
            ({"prune": {"enabled": True, "ratio": 0.5, "target_macs": 1000}}, "give either ratio or target_macs"),
            ({"prune": {"enabled": True, "ratoi": 0.5}}, "did you mean 'ratio'"),
            ({"prune": {"enabled": True, "ratio": 0.5, "layer_ratios": {"features.0.0": 1.0}}},
             "prune.layer_ratios.features.0.0: must be in [0, 1)"),
            ({"prune": {"enabled": True, "ratio": 0.5, "round_to": 0}}, "prune.round_to: must be >= 1"),
            ({"qat": {"enabled": True, "methods": {"feature": {"pairs": [["1.features", "1.features"]]}}}},
             "only logit KD"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
            load_pipeline(write_pipeline(tmp_path / "bad.yaml", **sections))
