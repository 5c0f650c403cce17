"""End-to-end builds of pipelines/digits.yaml through the real CLI, runtimes and converters."""

import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from conftest import DIGITS, build_until_checkpoint, read_report, run_cli, stage_statuses, write_pipeline

pytestmark = pytest.mark.slow

ALL_STAGES = ["data", "teacher", "distill", "export_onnx", "quantize", "export_tflite", "quantize_tflite", "evaluate",
              "benchmark", "arm_instructions", "gate", "report"]
ARTIFACTS = {"student_fp32.onnx", "student_int8.onnx", "student_fp32.tflite", "student_int8.tflite"}


def test_report_follows_the_contract(digits_run):
    r = read_report(digits_run)
    assert r["schema"] == "edgekd.report/1" and r["pipeline"] == "digits" and r["target"] == "android-arm64"
    t = r["teacher"]
    assert isinstance(t["params"], int) and t["trained_here"] is True and 0.9 <= t["accuracy"] <= 1.0
    assert set(t["latency_ms"]) >= {"p50", "p90", "p99"}
    assert {a["name"] for a in r["artifacts"]} == ARTIFACTS
    for a in r["artifacts"]:
        assert a["format"] in ("onnx", "tflite") and a["precision"] in ("fp32", "int8")
        assert (digits_run / a["path"]).is_file() and a["size_bytes"] == (digits_run / a["path"]).stat().st_size
        assert 0.0 <= a["accuracy"] <= 1.0 and 0.0 <= a["teacher_agreement"] <= 1.0
        assert a["accuracy"] > 0.85, a  # a real model, not chance (0.1)
        assert 0 < a["latency_ms"]["p50"] <= a["latency_ms"]["p90"] <= a["latency_ms"]["p99"]
        assert a["load_ms"] > 0 and a["peak_rss_bytes"] > 10 * 2**20 and isinstance(a["params"], int)
        assert "host" in a["measured_on"] and "not a measurement on an arm64 device" in a["measured_on"]
        # the measuring process holds only its runtime: far below a process with torch + TensorFlow loaded
        assert a["peak_rss_bytes"] < 700 * 2**20, a
    assert r["artifacts"][0]["params"] * 10 <= t["params"]
    assert r["gate"]["passed"] is True and all(isinstance(c["passed"], bool) for c in r["gate"]["checks"])
    on = [s for s in r["stages"] if s["status"] != "skipped"]  # optional stages (prune, qat...) are off here
    assert [s["name"] for s in on] == ALL_STAGES
    assert all(s["status"] == "ran" and s["seconds"] >= 0 for s in on)
    assert r["dataset"]["fingerprint"] and r["config_hash"] and r["versions"]["onnxruntime"]
    md = (digits_run / "report.md").read_text()
    assert "Gate: PASSED" in md and "student_int8.tflite" in md and "not the target device" in md


def test_every_artifact_loads_and_matches_in_its_runtime(digits_run):
    """Parity, checked here independently of the stages' own checks: fp32 files agree with the PyTorch student."""
    from edgekd.data.datasets import Splits
    from edgekd.models.zoo import model_from_config
    from edgekd.config import load_pipeline
    from edgekd.runtimes.ort_runner import OrtRunner
    from edgekd.runtimes.tflite_runner import TFLiteRunner

    cfg = load_pipeline(DIGITS)
    splits = Splits.load(digits_run / "stages/data/splits.npz")
    student = model_from_config(cfg.student, splits.input_shape, splits.num_classes)
    student.load_state_dict(torch.load(digits_run / "stages/distill/student.pt", weights_only=True))
    with torch.no_grad():
        ref = student.eval()(torch.from_numpy(splits.x_test[:])).numpy()
    stages = digits_run / "stages"
    for path, runner in ((stages / "export_onnx/student_fp32.onnx", OrtRunner),
                         (stages / "export_tflite/student_fp32.tflite", TFLiteRunner)):
        out = runner(path).predict(splits.x_test)
        assert np.abs(out - ref).max() < 1e-3, path
    for path, runner in ((stages / "quantize/student_int8.onnx", OrtRunner),
                         (stages / "quantize_tflite/student_int8.tflite", TFLiteRunner)):
        out = runner(path).predict(splits.x_test[:37])
        assert out.shape == (37, 10)
        assert (out.argmax(1) == ref[:37].argmax(1)).mean() >= 0.9, path
    data = json.loads((stages / "export_onnx/manifest.json").read_text())["data"]
    assert data["student"]["parity"]["max_abs_diff"] < 1e-4
    assert not list(stages.glob("export_onnx/*.data"))  # single-file ONNX


def test_second_build_is_fully_cached_and_fast(digits_copy):
    t0 = time.perf_counter()
    proc = run_cli("build", "--pipeline", DIGITS, "--run-dir", digits_copy)
    assert proc.returncode == 0, proc.stderr
    r = read_report(digits_copy)
    assert set(stage_statuses(r).values()) - {"skipped"} == {"cached"}
    assert r["build_seconds"] < 10, r["build_seconds"]
    assert time.perf_counter() - t0 < 30
    status = run_cli("status", "--pipeline", DIGITS, "--run-dir", digits_copy, "--json")
    assert {row["state"] for row in json.loads(status.stdout)} - {"skipped"} == {"up-to-date"}


@pytest.mark.parametrize("change, expected", [
    ({"budget": {"max_accuracy_drop": 0.06}}, {"gate", "report"}),
    ({"quantize": {"calibration_samples": 200}}, {"quantize", "evaluate", "benchmark", "arm_instructions", "gate",
                                                  "report"}),
    ({"distill": {"temperature": 3.0}}, set(ALL_STAGES) - {"data", "teacher"}),
    # int8 TFLite calibration: only the int8 TFLite is rebuilt, not the onnx2tf conversion
    ({"tflite": {"calibration_samples": 100}}, {"quantize_tflite", "evaluate", "benchmark", "arm_instructions",
                                                "gate", "report"}),
])
def test_a_change_reruns_exactly_what_depends_on_it(digits_copy, tmp_path, change, expected):
    pipeline = write_pipeline(tmp_path / "changed.yaml", name="digits", **change)
    status = json.loads(run_cli("status", "--pipeline", pipeline, "--run-dir", digits_copy, "--json").stdout)
    first_stale = next(row for row in status if row["state"] not in ("up-to-date", "skipped"))
    assert first_stale["stage"] == min(expected, key=ALL_STAGES.index) and "config changed" in first_stale["why"]
    proc = run_cli("build", "--pipeline", pipeline, "--run-dir", digits_copy)
    assert proc.returncode == 0, proc.stderr
    ran = {name for name, s in stage_statuses(read_report(digits_copy)).items() if s == "ran"}
    assert ran == expected


def test_impossible_budget_fails_the_gate_with_exit_1(digits_copy, tmp_path):
    pipeline = write_pipeline(tmp_path / "tight.yaml", name="digits",
                              budget={"max_accuracy_drop": 0.0, "max_latency_p50_ms": 1e-6, "max_size_bytes": 10})
    proc = run_cli("build", "--pipeline", pipeline, "--run-dir", digits_copy)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gate failed" in proc.stderr and "Traceback" not in proc.stderr
    r = read_report(digits_copy)
    assert r["gate"]["passed"] is False
    failing = {c["name"].split("[")[0] for c in r["gate"]["checks"] if not c["passed"]}
    assert failing == {"accuracy_drop", "latency_p50_ms", "size_bytes"}
    assert all((digits_copy / a["path"]).is_file() for a in r["artifacts"])  # a failed gate keeps everything
    assert run_cli("gate", digits_copy).returncode == 1


def test_build_from_a_user_supplied_teacher_checkpoint(digits_copy, tmp_path):
    from edgekd.config import load_pipeline
    from edgekd.data.datasets import Splits
    from edgekd.distill.trainer import train
    from edgekd.models.zoo import model_from_config

    cfg = load_pipeline(DIGITS)
    splits = Splits.load(digits_copy / "stages/data/splits.npz")
    teacher = model_from_config(cfg.teacher, splits.input_shape, splits.num_classes)
    cfg.teacher.train.epochs = 4
    train(teacher, cfg.teacher.train, splits.x_train, splits.y_train, splits.x_val, splits.y_val, seed=1,
          work_dir=tmp_path, log=lambda m: None)
    ckpt = tmp_path / "my_teacher.pt"
    torch.save(teacher.state_dict(), ckpt)
    pipeline = write_pipeline(tmp_path / "ckpt.yaml", name="digits",
                              teacher={"checkpoint": str(ckpt), "train": None})
    proc = run_cli("build", "--pipeline", pipeline, "--run-dir", digits_copy)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    r = read_report(digits_copy)
    assert r["teacher"]["trained_here"] is False and r["teacher"]["checkpoint"] == str(ckpt)
    assert stage_statuses(r)["data"] == "cached" and stage_statuses(r)["teacher"] == "ran"
    assert r["teacher"]["accuracy"] > 0.85


def test_killed_distillation_resumes_from_its_checkpoint(digits_copy, tmp_path):
    pipeline = write_pipeline(tmp_path / "long.yaml", name="digits", distill={"epochs": 40, "temperature": 5.0})
    ckpt = digits_copy / "stages" / "distill.work" / "checkpoint.pt"
    proc = build_until_checkpoint(digits_copy, pipeline, 3, timeout=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert 3 <= killed_at < 40
    again = run_cli("build", "--pipeline", pipeline, "--run-dir", digits_copy)
    assert again.returncode == 0, again.stderr
    resumed = [ln for ln in again.stdout.splitlines() if "resuming from the checkpoint after epoch" in ln]
    assert resumed and int(resumed[0].split("after epoch ")[1].split("/")[0]) >= killed_at
    r = read_report(digits_copy)
    assert stage_statuses(r)["data"] == "cached" and stage_statuses(r)["teacher"] == "cached"
    assert stage_statuses(r)["distill"] == "ran"
    history = json.loads((digits_copy / "stages/distill/manifest.json").read_text())["data"]["history"]
    assert len(history) == 40 and min(a["accuracy"] for a in r["artifacts"]) > 0.85


def test_corrupted_artifact_is_detected_and_rebuilt(digits_copy):
    """A damaged stage file is never used: with an intact copy in the stage store it is restored from there (nothing
    recomputed); with the store's copy damaged too (in a run dir they are hard links of one file) the stage reruns."""
    target = digits_copy / "stages/quantize/student_int8.onnx"
    good = target.read_bytes()
    target.unlink()  # the slot's file alone (a copied run dir holds the store's files as separate copies)
    target.write_bytes(good[:100])
    proc = run_cli("build", "--pipeline", DIGITS, "--run-dir", digits_copy)
    assert proc.returncode == 0, proc.stderr
    assert "quantize: stored output rejected" in proc.stdout and "digest mismatch" in proc.stdout
    assert "==> quantize: restored from the store" in proc.stdout
    assert stage_statuses(read_report(digits_copy))["quantize"] == "cached" and target.read_bytes() == good

    for damaged in [target, *(digits_copy / "store" / "quantize").glob("*/student_int8.onnx")]:
        damaged.unlink()
        damaged.write_bytes(good[:100])
    proc = run_cli("build", "--pipeline", DIGITS, "--run-dir", digits_copy)
    assert proc.returncode == 0, proc.stderr
    assert "quantize: stored output rejected" in proc.stdout and "rejected" in proc.stdout.split("==> quantize")[0]
    statuses = stage_statuses(read_report(digits_copy))
    assert statuses["quantize"] == "ran" and statuses["distill"] == "cached"
    assert len(target.read_bytes()) > 1000
