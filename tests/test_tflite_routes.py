"""The two PyTorch -> TFLite routes (litert-torch in its own environment, onnx2tf in edgekd's) and `tflite.converter`.

Everything runs for real: the litert-torch environment is created on first use (about a minute, then cached), the
converters convert, LiteRT loads the files in a fresh process, onnxruntime is the reference."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import read_report, run_cli, stage_statuses, write_pipeline


def _tflite_arts(report: dict) -> dict:
    return {a["name"]: a for a in report["artifacts"] if a["format"] == "tflite"}


def _static(name: str) -> dict:
    """What an int8 route records beside its outcome: full-integer (static) activations."""
    return {"activations": "static"} if "int8" in name else {}


def test_auto_converts_a_builtin_student_with_onnx2tf_first(digits_run):
    """auto's order for edgekd's own CNNs: onnx2tf (in-process, dynamic batch) first; litert-torch not even started."""
    arts = _tflite_arts(read_report(digits_run))
    for name in ("student_fp32.tflite", "student_int8.tflite"):
        conv = arts[name]["converter"]
        assert conv["converter"] == "onnx2tf" and conv["routes_tried"] == [{"converter": "onnx2tf", "ok": True,
                                                                            **_static(name)}]
        assert conv["versions"]["onnx2tf"] == "1.29.24" and conv["static_batch"] is None
        assert conv["ops"]["static_batch"] is None
        assert conv["size_bytes"] == (digits_run / arts[name]["path"]).stat().st_size


@pytest.mark.parametrize("arch, order", [("cnn-small", ("onnx2tf", "litert-torch")),
                                         ("depthwise-cnn", ("onnx2tf", "litert-torch")),
                                         ("torchvision:mobilenet_v3_small", ("litert-torch", "onnx2tf")),
                                         ("timm:efficientnet_lite0", ("litert-torch", "onnx2tf")),
                                         ("models.py:make_student", ("litert-torch", "onnx2tf"))])
def test_auto_route_order_follows_the_student_source(arch, order):
    from edgekd.config import ModelConfig
    from edgekd.stages.tflite_routes import route_order

    assert route_order("auto", ModelConfig(arch=arch)) == order
    assert route_order("litert-torch", ModelConfig(arch=arch)) == ("litert-torch",)
    assert route_order("onnx2tf", ModelConfig(arch=arch)) == ("onnx2tf",)


@pytest.fixture(scope="module")
def litert_run(digits_run, tmp_path_factory):
    """The digits build with its TFLite files made by litert-torch (the TFLite stages and what reads them rerun)."""
    import shutil

    run_dir = tmp_path_factory.mktemp("litert") / "run"
    shutil.copytree(digits_run, run_dir)
    pipe = write_pipeline(run_dir.parent / "p.yaml", tflite={"converter": "litert-torch"})
    proc = run_cli("build", "--target", "x86-64", "--pipeline", pipe, "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_litert_route_records_its_versions_ops_and_static_batch(litert_run):
    arts = _tflite_arts(read_report(litert_run))
    for name in ("student_fp32.tflite", "student_int8.tflite"):
        conv = arts[name]["converter"]
        assert conv["converter"] == "litert-torch" and conv["routes_tried"] == [{"converter": "litert-torch",
                                                                                 "ok": True, **_static(name)}]
        assert conv["versions"]["litert-torch"] == "0.10.0" and conv["versions"]["ai-edge-litert"].startswith("2.3")
        assert conv["static_batch"] == 1 and conv["ops"]["static_batch"] == 1 and conv["seconds"] > 0
        assert conv["size_bytes"] == (litert_run / arts[name]["path"]).stat().st_size
    fp32, int8 = arts["student_fp32.tflite"]["converter"]["ops"], arts["student_int8.tflite"]["converter"]["ops"]
    assert fp32["int8_ops"] == 0 and fp32["quantize"] == 0 and fp32["float_ops"] > 0
    # full-integer: the convolutions and dense layers run in int8; the float input is quantized once
    assert int8["int8_ops"] >= 4 and int8["quantize"] >= 1 and int8["ops"]["CONV_2D"] >= 1


def test_litert_files_match_onnxruntime_at_any_batch(litert_run):
    """A batch-1 static file still evaluates whole splits: the runner runs it an image at a time."""
    from edgekd.data.datasets import to_float
    from edgekd.runtimes.ort_runner import OrtRunner
    from edgekd.runtimes.tflite_runner import TFLiteRunner

    stages = litert_run / "stages"
    with np.load(stages / "data" / "splits.npz") as z:
        x = to_float(z["x_test"][:37])
    ref = OrtRunner(stages / "export_onnx" / "student_fp32.onnx").predict(x)
    fp32 = TFLiteRunner(stages / "export_tflite" / "student_fp32.tflite")
    assert not fp32.dynamic_batch and fp32.model_batch == 1
    got = fp32.predict(x)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    q = TFLiteRunner(stages / "quantize_tflite" / "student_int8.tflite").predict(x)
    assert (q.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_auto_falls_back_to_litert_torch_where_onnx2tf_makes_a_file_no_device_loads(digits_copy, tmp_path):
    """A real failure of the first route: a built-in GELU student, whose Erf onnx2tf can only write as the Select
    op FlexErf (LiteRT without TensorFlow cannot load it). auto records that and ships litert-torch's files."""
    pipe = write_pipeline(tmp_path / "gelu.yaml", distill={"epochs": 3},
                          student={"arch": "cnn", "args": {"channels": [8, 16], "hidden": 32, "activation": "gelu"}},
                          tflite={"converter": "auto", "parity_samples": 100},
                          budget={"max_accuracy_drop": 1.0})  # 3 epochs: the conversion, not the student, is tested
    proc = run_cli("build", "--target", "x86-64", "--pipeline", pipe, "--run-dir", digits_copy)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arts = _tflite_arts(read_report(digits_copy))
    for name in ("student_fp32.tflite", "student_int8.tflite"):
        conv = arts[name]["converter"]
        assert conv["converter"] == "litert-torch" and conv["static_batch"] == 1
        first, second = conv["routes_tried"]
        assert first["converter"] == "onnx2tf" and "Erf" in first["error"]  # FlexErf in fp32, tf.Erf in int8
        assert second == {"converter": "litert-torch", "ok": True, **_static(name)}
    out = proc.stdout + proc.stderr
    assert "tflite.converter auto: onnx2tf then litert-torch" in out and "onnx2tf route failed" in out


def test_a_route_that_fails_fails_its_stage_in_one_line_and_keeps_the_rest(digits_copy, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    pipe = write_pipeline(tmp_path / "p.yaml", tflite={"converter": "litert-torch", "calibration_samples": 100})
    proc = run_cli("build", "--target", "x86-64", "--pipeline", pipe, "--run-dir", digits_copy,
                   env={"EDGEKD_ENV_DIR": str(blocker / "envs")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "stage export_tflite: no converter made a working student_fp32.tflite: litert-torch: " in last
    assert "cannot create its environment" in last and last.startswith("edgekd: ")
    r = read_report(digits_copy)
    st = stage_statuses(r)
    assert st["export_tflite"] == "failed" and st["quantize_tflite"] == "failed" and st["evaluate"] == "ran"
    assert {a["name"] for a in r["artifacts"]} == {"student_fp32.onnx", "student_int8.onnx"}
    assert {"student_fp32.tflite", "student_int8.tflite"} <= set(r["missing_artifacts"])


@pytest.mark.parametrize("routes, setting, attempts", [
    (("onnx2tf", "litert-torch"), "auto", [("onnx2tf", "static"), ("litert-torch", "static"),
                                            ("litert-torch", "dynamic")]),
    (("litert-torch", "onnx2tf"), "auto", [("litert-torch", "static"), ("onnx2tf", "static"),
                                            ("litert-torch", "dynamic")]),
    (("onnx2tf",), "auto", [("onnx2tf", "static")]),
    (("litert-torch",), "static", [("litert-torch", "static")]),
    (("onnx2tf", "litert-torch"), "dynamic", [("litert-torch", "dynamic")]),
    (("onnx2tf",), "dynamic", [("onnx2tf", "dynamic")])])  # tried, so that its refusal is recorded
def test_int8_attempts_put_every_full_integer_file_before_dynamic_activations(routes, setting, attempts):
    from edgekd.stages.quantize_tflite import int8_attempts

    assert int8_attempts(routes, setting) == attempts


def test_int8_with_dynamic_activations_is_made_checked_and_said(litert_run, tmp_path):
    """`int8_activations: dynamic` (what auto falls back to when no full-integer file agrees; the trained ViT-Tiny of
    the architecture matrix is such a model): litert-torch's int8 weights with activations quantized at run time,
    float input and output, checked like any int8 file and named as such in report.json and report.md."""
    import shutil

    from edgekd.runtimes.tflite_runner import TFLiteRunner

    run_dir = tmp_path / "run"
    shutil.copytree(litert_run, run_dir)
    pipe = write_pipeline(tmp_path / "p.yaml", tflite={"converter": "litert-torch", "int8_activations": "dynamic"})
    proc = run_cli("build", "--target", "x86-64", "--pipeline", pipe, "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read_report(run_dir)
    conv = _tflite_arts(r)["student_int8.tflite"]["converter"]
    assert conv["routes_tried"] == [{"converter": "litert-torch", "activations": "dynamic", "ok": True}]
    assert conv["activations"] == "dynamic"
    assert conv["ops"]["int8_ops"] == 0 and conv["ops"]["quantize"] == 0  # float kernels over int8 weights
    fp32 = _tflite_arts(r)["student_fp32.tflite"]
    assert _tflite_arts(r)["student_int8.tflite"]["size_bytes"] < 0.7 * fp32["size_bytes"]  # int8 weights
    runner = TFLiteRunner(run_dir / "stages" / "quantize_tflite" / "student_int8.tflite")
    assert runner.input_dtype == np.float32
    agree = json.loads((run_dir / "stages" / "quantize_tflite" / "manifest.json").read_text())["data"]
    assert agree["int8_parity"]["top1_agreement"] >= 0.95
    assert "int8 weights with dynamic activations" in proc.stdout + proc.stderr
    assert "student_int8.tflite: made by litert-torch 0.10.0 (static batch 1); int8 weights with dynamic " \
           "activations" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("value, expected", [("litert", "tflite.converter"), ("tflite", "tflite.converter")])
def test_converter_setting_is_validated(tmp_path, value, expected):
    pipe = write_pipeline(tmp_path / "p.yaml", tflite={"converter": value})
    proc = run_cli("build", "--pipeline", pipe, "--run-dir", tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert expected in line and "litert-torch" in line and "onnx2tf" in line
    assert not (tmp_path / "run" / "stages").exists()  # refused before any work


def test_op_summary_reads_the_flatbuffer(litert_run):
    from edgekd.export.tflite_ops import op_summary

    s = op_summary(litert_run / "stages" / "quantize_tflite" / "student_int8.tflite")
    assert s["total"] == sum(s["ops"].values()) and s["quantize"] == s["ops"].get("QUANTIZE", 0)
    assert s["float_ops"] + s["int8_ops"] <= s["total"]
    with pytest.raises(Exception):
        op_summary(Path(__file__))  # not a flatbuffer
