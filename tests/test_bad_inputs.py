"""Bad input, faults and untrusted files through the real CLI: exit 2, one clear line, no traceback,
and nothing already built in the run directory is touched."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DIGITS, REPO, read_report, run_cli, stage_statuses, write_pipeline

pytestmark = pytest.mark.slow


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _npz(tmp, name, **arrays):
    path = tmp / name
    np.savez(path, **arrays)
    return path


def _digits_cfg(tmp, name="bad.yaml", **sections):
    return write_pipeline(tmp / name, name="digits", **sections)


def _teacher_ckpt(tmp, num_classes=10, arch_args=None):
    from edgekd.models.zoo import build_model

    model = build_model("cnn", arch_args or {"channels": [32, 64], "hidden": 256}, (1, 8, 8), num_classes)
    path = tmp / f"teacher_{num_classes}.pt"
    torch.save(model.state_dict(), path)
    return path


# Each case: (id, function(tmp) -> extra CLI args, text the one-line error must contain)
CASES = [
    # --- configuration
    ("unknown-key", lambda t: ["-p", _digits_cfg(t, distill={"temperatur": 3})],
     "distill.temperatur: unknown key (did you mean 'temperature'?)"),
    ("unknown-section", lambda t: ["-p", _digits_cfg(t, budgett={})], "budgett: unknown key (did you mean 'budget'?)"),
    ("wrong-type", lambda t: ["-p", _digits_cfg(t, distill={"epochs": "ten"})], "distill.epochs: expected an integer"),
    ("negative-temperature", lambda t: ["-p", _digits_cfg(t, distill={"temperature": -2})],
     "distill.temperature: must be > 0"),
    ("alpha-out-of-range", lambda t: ["-p", _digits_cfg(t, distill={"alpha": 1.2})], "distill.alpha: must be in [0, 1]"),
    ("zero-lr", lambda t: ["-p", _digits_cfg(t, distill={"lr": 0})], "distill.lr: must be > 0"),
    ("missing-teacher-source", lambda t: ["-p", _digits_cfg(t, teacher={"train": None})], "give either 'checkpoint'"),
    ("unknown-dataset", lambda t: ["-p", _digits_cfg(t, data={"dataset": "cifar10"})], "'cifar10' is not one of"),
    ("unknown-arch", lambda t: ["-p", _digits_cfg(t, student={"arch": "resnet"})], "unknown architecture 'resnet'"),
    ("bad-arch-args", lambda t: ["-p", _digits_cfg(t, student={"arch": "cnn", "args": {"chanels": [4]}})],
     "student.args: unknown argument 'chanels' (did you mean 'channels'?)"),
    ("invalid-yaml", lambda t: ["-p", _write(t / "broken.yaml", "distill: {epochs: [1,\n")], "not valid YAML"),
    ("pipeline-missing", lambda t: ["-p", t / "nope.yaml"], "pipeline file not found"),
    ("unknown-target", lambda t: ["-p", DIGITS, "--target", "android-arm46"], "did you mean 'android-arm64'"),
    ("bad-target-file", lambda t: ["-p", DIGITS, "--target", _write(t / "dev.yaml", "threads: -1\n")],
     "threads: must be >= 1"),
    ("unknown-stage", lambda t: ["-p", DIGITS, "--from", "quantise"], "--from quantise: no such stage"),
    # --- data
    ("npz-missing", lambda t: ["-p", _digits_cfg(t, data={"dataset": "npz", "path": str(t / "none.npz")})],
     "npz dataset not found"),
    ("npz-empty", lambda t: ["-p", _digits_cfg(t, data={"dataset": "npz", "path": str(_npz(
        t, "e.npz", x_train=np.zeros((0, 8, 8), np.float32), y_train=np.zeros(0, np.int64)))})],
     "training data is empty"),
    ("npz-nan", lambda t: ["-p", _digits_cfg(t, data={"dataset": "npz", "path": str(_npz(
        t, "n.npz", x_train=np.full((20, 8, 8), np.nan, np.float32), y_train=np.zeros(20, np.int64)))})],
     "contain NaN or infinite values"),
    ("npz-count-mismatch", lambda t: ["-p", _digits_cfg(t, data={"dataset": "npz", "path": str(_npz(
        t, "c.npz", x_train=np.zeros((20, 8, 8), np.float32), y_train=np.zeros(19, np.int64)))})],
     "20 images but 19 labels"),
    ("npz-wrong-shape", lambda t: ["-p", _digits_cfg(t, data={"dataset": "npz", "path": str(_npz(
        t, "s.npz", x_train=np.zeros((20, 64), np.float32), y_train=np.zeros(20, np.int64)))})],
     "x_train has shape (20, 64)"),
    ("fashion-mnist-missing", lambda t: ["-p", _digits_cfg(t, data={"dataset": "fashion-mnist",
                                                                   "path": str(t / "no-such-dir")})],
     "fashion-mnist not found"),
    ("image-folder-one-class", lambda t: ["-p", _digits_cfg(t, data={"dataset": "image-folder",
                                                                    "path": str(_folder(t))})],
     "needs one sub-folder per class"),
    ("teacher-class-count", lambda t: ["-p", _digits_cfg(t, teacher={"checkpoint": str(_teacher_ckpt(t, 7)),
                                                                     "train": None})],
     "the teacher outputs 7 classes"),
    # --- checkpoints
    ("checkpoint-missing", lambda t: ["-p", _digits_cfg(t, teacher={"checkpoint": str(t / "gone.pt"), "train": None})],
     "checkpoint not found"),
    ("checkpoint-truncated", lambda t: ["-p", _digits_cfg(t, teacher={"checkpoint": str(_truncated(t)), "train": None})],
     "truncated or corrupt"),
    ("checkpoint-other-arch", lambda t: ["-p", _digits_cfg(t, teacher={
        "checkpoint": str(_teacher_ckpt(t, 10, {"channels": [8], "hidden": 16})), "train": None})],
     "not a state dict for architecture 'cnn'"),
    # --- training
    ("diverging-loss", lambda t: ["-p", _digits_cfg(t, teacher={"train": {"epochs": 2, "lr": 1e12, "optimizer": "sgd"}})],
     "loss became"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _folder(tmp):
    (tmp / "imgs" / "only").mkdir(parents=True, exist_ok=True)
    return tmp / "imgs"


def _truncated(tmp):
    good = _teacher_ckpt(tmp)
    cut = tmp / "cut.pt"
    cut.write_bytes(good.read_bytes()[:300])
    return cut


def _snapshot(run_dir: Path) -> dict:
    """Digests of everything built: stage outputs and reports (not the lock, failure notes or resume folders)."""
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock" and not p.name.endswith(".failed.json")
            and not any(part.endswith(".work") for part in p.relative_to(run_dir).parts)}


def _assert_untouched(run_dir: Path, before: dict) -> None:
    """Every file that was built before is still there, byte for byte."""
    after = _snapshot(run_dir)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, changed


@pytest.fixture(scope="module")
def built(digits_run, tmp_path_factory):
    dst = tmp_path_factory.mktemp("bad") / "run"
    shutil.copytree(digits_run, dst)
    return dst


def _assert_clean_failure(proc, needle):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("edgekd: error: "), proc.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_keeps_the_build(case, built, tmp_path):
    _, make_args, needle = case
    before = _snapshot(built)
    proc = run_cli("build", *make_args(tmp_path), "--run-dir", built)
    _assert_clean_failure(proc, needle)
    _assert_untouched(built, before)


def test_malicious_checkpoint_is_refused_and_never_runs(built, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"1.classifier.weight": torch.zeros(10, 4), "x": _Evil(marker)}, evil)
    before = _snapshot(built)
    proc = run_cli("build", "-p", _digits_cfg(tmp_path, teacher={"checkpoint": str(evil), "train": None}),
                   "--run-dir", built)
    _assert_clean_failure(proc, "refused")
    assert "allow_pickle" in proc.stderr and "arbitrary code" in proc.stderr
    assert not marker.exists()
    _assert_untouched(built, before)


def test_locked_run_dir_is_refused(built):
    import fcntl

    fd = os.open(built / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"424242", 0)
    try:
        proc = run_cli("build", "-p", DIGITS, "--run-dir", built)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    _assert_clean_failure(proc, "in use by another build (pid 424242)")


def test_only_without_inputs_and_gate_without_report(tmp_path):
    _assert_clean_failure(run_cli("build", "-p", DIGITS, "--run-dir", tmp_path / "empty", "--only", "quantize"),
                          "--only quantize: its input data has not been built")
    _assert_clean_failure(run_cli("gate", tmp_path), "no report at")


def test_converter_failure_keeps_other_artifacts_and_marks_missing(digits_copy, tmp_path):
    """A GELU student: ONNX export, PTQ and the fp32 TFLite work, TFLite int8 cannot convert Erf. The failing stage
    is named with the op and the artifact, everything else (the fp32 TFLite too) is built, evaluated and kept, the
    report marks what is missing, exit 2."""
    pipeline = write_pipeline(tmp_path / "gelu.yaml", name="digits", distill={"epochs": 3},
                              student={"arch": "cnn", "args": {"channels": [8, 16], "hidden": 32,
                                                               "activation": "gelu"}})
    proc = run_cli("build", "-p", pipeline, "--run-dir", digits_copy)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "stage quantize_tflite" in err and "student_int8.tflite" in err and "Erf" in err
    r = read_report(digits_copy)
    assert stage_statuses(r)["quantize_tflite"] == "failed" and stage_statuses(r)["export_tflite"] == "ran"
    assert {a["name"] for a in r["artifacts"]} == {"student_fp32.onnx", "student_int8.onnx", "student_fp32.tflite"}
    assert set(r["missing_artifacts"]) == {"student_int8.tflite"}
    assert r["gate"]["passed"] is False  # never passes with a required artifact missing
    assert all((digits_copy / a["path"]).is_file() for a in r["artifacts"])


_BLOCK_SOCKETS = """


def _refuse(*args, **kwargs):
    raise OSError("network blocked by the edgekd test")


socket.socket.connect = socket.socket.connect_ex = socket.create_connection = _refuse
"""


def test_build_without_network(tmp_path):
    """A whole build with no network: in an empty network namespace where `unshare -n` is allowed (root, as in
    CI), else with every socket connect refused in the build process and each subprocess it starts
    (a sitecustomize on PYTHONPATH). Either way nothing may need the network."""
    probe = subprocess.run(["unshare", "-n", sys.executable, "-c",
                            "import socket; s=socket.socket(); s.settimeout(2); s.connect(('1.1.1.1', 80))"],
                           capture_output=True, text=True)
    env = None
    if probe.returncode != 0 and "unreachable" in probe.stderr.lower():
        prefix = ["unshare", "-n"]
    else:
        assert probe.returncode != 0, "unshare -n ran but the namespace still reaches the network"
        blocker = tmp_path / "block"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text(_BLOCK_SOCKETS)
        prefix, env = [], {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    run_dir = tmp_path / "offline"
    proc = subprocess.run([*prefix, sys.executable, "-m", "edgekd", "build", "-p", str(DIGITS),
                           "--run-dir", str(run_dir)], capture_output=True, text=True, cwd=REPO, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {a["name"] for a in read_report(run_dir)["artifacts"]} == {
        "student_fp32.onnx", "student_int8.onnx", "student_fp32.tflite", "student_int8.tflite"}
