"""Bad input, faults and untrusted files through the real CLI: exit 2, one clear line, no traceback,
and nothing already built in the run directory is touched."""

import dataclasses
import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DIGITS, REPO, read_report, run_cli, stage_statuses, write_pipeline
from edgekd.config import BudgetConfig, ConfigError, load_pipeline

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
    # --- files that are not YAML text (issue 15)
    ("pipeline-random-bytes", lambda t: ["-p", _bytes(t / "random.yaml", random.Random(15).randbytes(4096))],
     "not a YAML text file"),
    ("pipeline-utf16", lambda t: ["-p", _bytes(t / "utf16.yaml", DIGITS.read_text().encode("utf-16"))],
     "not a YAML text file (it holds binary data)"),
    ("pipeline-latin1", lambda t: ["-p", _bytes(t / "latin1.yaml", "name: d\xefgits\n".encode("latin-1"))],
     "not a YAML text file (not UTF-8 at byte 7)"),
    ("pipeline-is-a-directory", lambda t: ["-p", t], "is a directory, not a pipeline YAML file"),
    ("pipeline-nested-too-deeply", lambda t: ["-p", _write(t / "deep.yaml", "[" * 100_000)], "nested too deeply"),
    ("target-random-bytes", lambda t: ["-p", DIGITS, "--target", _bytes(t / "dev.yaml", b"\xff\xfe\x00\x01" * 64)],
     "not a YAML text file"),
    # --- pipeline names that would put runs/<name>-<target> elsewhere (issue 15); refused with --run-dir too
    ("name-with-parent-dirs", lambda t: ["-p", _named(t, "../../../somewhere/else")], "name '../../../somewhere/else'"),
    ("name-absolute", lambda t: ["-p", _named(t, "/tmp/elsewhere")], "use 1-100 letters, digits"),
    ("name-dot-dot", lambda t: ["-p", _named(t, "..")], "name '..'"),
    ("name-hidden", lambda t: ["-p", _named(t, ".hidden")], "starting with a letter or digit"),
    ("name-too-long", lambda t: ["-p", _named(t, "x" * 101)], "use 1-100 letters"),
    ("name-from-file-name", lambda t: ["-p", _write(t / "my pipeline.yaml", "\n".join(
        ln for ln in DIGITS.read_text().splitlines() if not ln.startswith("name:")))],
     "name (from the file name; set `name:`) 'my pipeline'"),
    # --- limits that make no sense (issue 15; every numeric limit in test_every_budget_limit_has_a_range)
    ("negative-max-accuracy-drop", lambda t: ["-p", _digits_cfg(t, budget={"max_accuracy_drop": -0.01})],
     "budget.max_accuracy_drop: must be in [0, 1]"),
    ("per-artifact-zero-latency", lambda t: ["-p", _digits_cfg(t, budget={
        "per_artifact": {"student_int8.tflite": {"max_latency_p50_ms": 0}}})],
     "budget.per_artifact.student_int8.tflite.max_latency_p50_ms: must be > 0"),
    ("infinite-limit", lambda t: ["-p", _digits_cfg(t, budget={"max_latency_p90_ms": float("inf")})],
     "budget.max_latency_p90_ms: an infinite value is not allowed"),
    ("empty-budget-artifacts", lambda t: ["-p", _digits_cfg(t, budget={"artifacts": []})],
     "budget.artifacts: an empty list checks nothing"),
    ("regression-decrease-above-1", lambda t: ["-p", _digits_cfg(t, budget={"regression": {"max_accuracy_decrease": 5}})],
     "budget.regression.max_accuracy_decrease: must be at most 1"),
    # --- a teacher whose weights or outputs are not finite: refused at the teacher stage, the good one is kept
    ("teacher-nan-weights", lambda t: ["-p", _digits_cfg(t, teacher={
        "checkpoint": str(_teacher_ckpt_scaled(t, float("nan"))), "train": None})],
     "stage teacher: teacher: checkpoint"),
    ("teacher-inf-weights", lambda t: ["-p", _digits_cfg(t, teacher={
        "checkpoint": str(_teacher_ckpt_scaled(t, float("inf"))), "train": None})],
     "has NaN or infinite values in"),
    ("teacher-overflowing-outputs", lambda t: ["-p", _digits_cfg(t, teacher={
        "checkpoint": str(_teacher_ckpt_scaled(t, 1e30)), "train": None})],
     "stage teacher: teacher: its outputs are NaN or infinite"),
]


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _named(tmp: Path, name: str) -> Path:
    return write_pipeline(tmp / "named.yaml", name=name)


def _teacher_ckpt_scaled(tmp: Path, factor: float) -> Path:
    """A state dict of the digits teacher's architecture with every weight multiplied by `factor` (nan, inf, 1e30)."""
    state = torch.load(_teacher_ckpt(tmp), weights_only=True)
    path = tmp / f"teacher_x{factor}.pt"
    torch.save({k: v * factor if v.is_floating_point() else v for k, v in state.items()}, path)
    return path


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
    """A GELU student on the onnx2tf route: ONNX export and PTQ work; TFLite cannot take its Erf. The TFLite stage that fails is named with
    the artifact and the op, everything else is built, evaluated and kept, the report marks what is missing, exit 2.
    A TFLite file that loads only where TensorFlow's Select ops are linked in (onnx2tf writes FlexErf for the erf of
    torch 2.14's GELU export) is such a failure, found at build time: no artifact is kept that a device cannot load."""
    from edgekd.runtimes.tflite_runner import check_loads_without_tensorflow

    # litert-torch converts GELU (tests/test_tflite_routes.py); this pins the onnx2tf route, whose Erf is the failure.
    pipeline = write_pipeline(tmp_path / "gelu.yaml", name="digits", distill={"epochs": 3},
                              student={"arch": "cnn", "args": {"channels": [8, 16], "hidden": 32,
                                                               "activation": "gelu"}},
                              tflite={"converter": "onnx2tf"})
    proc = run_cli("build", "-p", pipeline, "--run-dir", digits_copy)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert ("stage export_tflite" in err and "student_fp32.tflite" in err or
            "stage quantize_tflite" in err and "student_int8.tflite" in err) and "Erf" in err, err
    r = read_report(digits_copy)
    statuses = stage_statuses(r)
    assert statuses["report"] == "ran" and statuses["evaluate"] == "ran" and statuses["benchmark"] == "ran"
    failed = "export_tflite" if "stage export_tflite" in err else "quantize_tflite"
    assert statuses[failed] == "failed"
    names = {a["name"] for a in r["artifacts"]}
    assert {"student_fp32.onnx", "student_int8.onnx"} <= names and "student_int8.tflite" not in names
    assert "student_int8.tflite" in r["missing_artifacts"]
    assert set(r["missing_artifacts"]) | names == {"student_fp32.onnx", "student_int8.onnx", "student_fp32.tflite",
                                                   "student_int8.tflite"}
    assert r["gate"]["passed"] is False  # never passes with a required artifact missing
    assert all((digits_copy / a["path"]).is_file() for a in r["artifacts"])
    for a in r["artifacts"]:
        if a["format"] == "tflite":
            check_loads_without_tensorflow(digits_copy / a["path"], "test")


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


# ---------------------------------------------------------------------------------------------- issue 15

def _limit_cases():
    """(field, bad value) for every numeric limit of the budget, including fields added later: fractions get a
    negative value and one above 1, every other min_/max_ limit 0 and a negative value."""
    import typing

    from edgekd.config import _FRACTION_LIMITS

    hints = typing.get_type_hints(BudgetConfig)
    for f in dataclasses.fields(BudgetConfig):
        kind = typing.get_args(hints[f.name])[0] if typing.get_args(hints[f.name]) else hints[f.name]
        if kind not in (int, float) or not f.name.startswith(("max_", "min_")):
            continue
        bad = (-0.01, 1.5) if f.name in _FRACTION_LIMITS else (0, -1)
        for value in bad:
            yield f.name, kind(value)


@pytest.mark.parametrize("name, value", list(_limit_cases()))
def test_every_budget_limit_has_a_range(name, value, tmp_path):
    from edgekd.config import Limits

    per_artifact = [{"per_artifact": {"student_int8.onnx": {name: value}}}] if name in Limits.__dataclass_fields__ else []
    for where in ({name: value}, *per_artifact):
        path = write_pipeline(tmp_path / "limit.yaml", budget=where)
        with pytest.raises(ConfigError, match=rf"budget\.(per_artifact\.student_int8\.onnx\.)?{name}: must be"):
            load_pipeline(path)


def test_budget_limit_cases_cover_the_known_limits():
    names = {name for name, _ in _limit_cases()}
    assert {"max_accuracy_drop", "max_relative_accuracy_drop", "min_accuracy", "max_latency_p50_ms",
            "max_size_bytes", "max_peak_rss_bytes", "min_accelerator_node_fraction"} <= names


def _unusable_run_dir(kind: str, tmp: Path) -> Path:
    plain = tmp / "plain-file"
    plain.write_text("keep me")
    if kind == "regular-file":
        return plain
    if kind == "symlink-to-file":
        (tmp / "link").symlink_to(plain)
        return tmp / "link"
    if kind == "dangling-symlink":
        (tmp / "dangling").symlink_to(tmp / "nowhere")
        return tmp / "dangling"
    if kind == "under-a-file":
        return plain / "run"
    if kind == "virtual-file-system":
        return Path("/proc/edgekd-run")
    if kind == "read-only-file-system":
        ro = tmp / "ro"
        ro.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
        return ro / "run"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, needle", [
    ("regular-file", "exists and is not a directory"),
    ("symlink-to-file", "exists and is not a directory"),
    ("dangling-symlink", "a symbolic link to nothing"),
    ("under-a-file", "cannot be used as a run directory (Not a directory)"),
    ("virtual-file-system", "cannot be used as a run directory (No such file or directory)"),
    ("read-only-file-system", "cannot be used as a run directory (Read-only file system)"),
])
def test_a_run_dir_that_cannot_be_one_is_refused(kind, needle, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    run_dir = _unusable_run_dir(kind, work)
    before = sorted(p.relative_to(work).as_posix() for p in work.rglob("*"))
    try:
        proc = run_cli("build", "-p", DIGITS, "--run-dir", run_dir)
        _assert_clean_failure(proc, needle)
        assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == before  # nothing created
        assert (work / "plain-file").read_text() == "keep me"
        assert not Path("/proc/edgekd-run").exists()
    finally:
        if kind == "read-only-file-system":
            subprocess.run(["umount", "-l", str(work / "ro")], check=False)


def test_a_name_or_target_cannot_move_the_default_run_dir_out_of_runs(tmp_path):
    """No --run-dir: the default runs/<name>-<target> is a plain name inside runs/ or the build is refused; nothing
    is created, in runs/ or anywhere else."""
    work = tmp_path / "deep" / "er" / "work"
    work.mkdir(parents=True)
    escape = write_pipeline(tmp_path / "escape.yaml", name="../../../somewhere/else")
    proc = run_cli("build", "-p", escape, cwd=work)
    _assert_clean_failure(proc, "name '../../../somewhere/else': use 1-100 letters, digits, '.', '_' or '-'")
    evil_target = tmp_path / "evil-target.yaml"
    profile = (REPO / "devices" / "android-arm64.yaml").read_text()
    evil_target.write_text("\n".join(ln for ln in profile.splitlines() if not ln.startswith("name:"))
                           + "\nname: ../../../target-escape\n")
    proc = run_cli("build", "-p", DIGITS, "--target", evil_target, cwd=work)
    _assert_clean_failure(proc, "target name '../../../target-escape'")
    created = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert created == ["deep", "deep/er", "deep/er/work", "escape.yaml", "evil-target.yaml"], created
