"""The two PyTorch -> TFLite routes (litert-torch in its own environment, onnx2tf in edgekd's) and `tflite.converter`.

Everything runs for real: the litert-torch environment is created on first use (about a minute, then cached), the
converters convert, LiteRT loads the files in a fresh process, onnxruntime is the reference."""

from pathlib import Path

import numpy as np
import pytest

from conftest import read_report, run_cli, stage_statuses, write_pipeline


def _tflite_arts(report: dict) -> dict:
    return {a["name"]: a for a in report["artifacts"] if a["format"] == "tflite"}


def test_default_route_is_litert_torch_with_its_versions_ops_and_static_batch(digits_run):
    arts = _tflite_arts(read_report(digits_run))
    for name in ("student_fp32.tflite", "student_int8.tflite"):
        conv = arts[name]["converter"]
        assert conv["converter"] == "litert-torch" and conv["routes_tried"] == [{"converter": "litert-torch",
                                                                                 "ok": True}]
        assert conv["versions"]["litert-torch"] == "0.10.0" and conv["versions"]["ai-edge-litert"].startswith("2.3")
        assert conv["static_batch"] == 1 and conv["ops"]["static_batch"] == 1 and conv["seconds"] > 0
        assert conv["size_bytes"] == (digits_run / arts[name]["path"]).stat().st_size
    fp32, int8 = arts["student_fp32.tflite"]["converter"]["ops"], arts["student_int8.tflite"]["converter"]["ops"]
    assert fp32["int8_ops"] == 0 and fp32["quantize"] == 0 and fp32["float_ops"] > 0
    # full-integer: the convolutions and dense layers run in int8; the float input is quantized once
    assert int8["int8_ops"] >= 4 and int8["quantize"] >= 1 and int8["ops"]["CONV_2D"] >= 1


def test_litert_files_match_onnxruntime_at_any_batch(digits_run):
    """A batch-1 static file still evaluates whole splits: the runner runs it an image at a time."""
    from edgekd.data.datasets import to_float
    from edgekd.runtimes.ort_runner import OrtRunner
    from edgekd.runtimes.tflite_runner import TFLiteRunner

    stages = digits_run / "stages"
    with np.load(stages / "data" / "splits.npz") as z:
        x = to_float(z["x_test"][:37])
    ref = OrtRunner(stages / "export_onnx" / "student_fp32.onnx").predict(x)
    fp32 = TFLiteRunner(stages / "export_tflite" / "student_fp32.tflite")
    assert not fp32.dynamic_batch and fp32.model_batch == 1
    got = fp32.predict(x)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    q = TFLiteRunner(stages / "quantize_tflite" / "student_int8.tflite").predict(x)
    assert (q.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_auto_falls_back_to_onnx2tf_when_litert_torch_cannot_run(digits_copy, tmp_path):
    """A real failure of the first route (its environment cannot be created: the env dir is under a regular file):
    auto records it and ships onnx2tf's files, with the dynamic batch that route keeps."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    pipe = write_pipeline(tmp_path / "p.yaml", tflite={"converter": "auto", "parity_samples": 100})  # a new key: both stages run
    proc = run_cli("build", "--target", "x86-64", "--pipeline", pipe, "--run-dir", digits_copy,
                   env={"EDGEKD_ENV_DIR": str(blocker / "envs")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    arts = _tflite_arts(read_report(digits_copy))
    for name in ("student_fp32.tflite", "student_int8.tflite"):
        conv = arts[name]["converter"]
        assert conv["converter"] == "onnx2tf" and conv["versions"]["onnx2tf"] == "1.29.24"
        first, second = conv["routes_tried"]
        assert first["converter"] == "litert-torch" and "cannot create its environment" in first["error"]
        assert second == {"converter": "onnx2tf", "ok": True} and conv["ops"]["static_batch"] is None
    assert "litert-torch route failed" in proc.stdout + proc.stderr


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


@pytest.mark.parametrize("value, expected", [("litert", "tflite.converter"), ("tflite", "tflite.converter")])
def test_converter_setting_is_validated(tmp_path, value, expected):
    pipe = write_pipeline(tmp_path / "p.yaml", tflite={"converter": value})
    proc = run_cli("build", "--pipeline", pipe, "--run-dir", tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert expected in line and "litert-torch" in line and "onnx2tf" in line
    assert not (tmp_path / "run" / "stages").exists()  # refused before any work


def test_op_summary_reads_the_flatbuffer(digits_run):
    from edgekd.export.tflite_ops import op_summary

    s = op_summary(digits_run / "stages" / "quantize_tflite" / "student_int8.tflite")
    assert s["total"] == sum(s["ops"].values()) and s["quantize"] == s["ops"].get("QUANTIZE", 0)
    assert s["float_ops"] + s["int8_ops"] <= s["total"]
    with pytest.raises(Exception):
        op_summary(Path(__file__))  # not a flatbuffer
