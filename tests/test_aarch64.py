"""The aarch64 runner: the target's own runtimes under QEMU user-mode emulation, accuracy with the target's
arithmetic, and exact per-inference instruction counts (edgekd/runtimes/aarch64.py, stages evaluate and
arm_instructions).

These run the real aarch64 onnxruntime and LiteRT builds on the artifacts of the shared digits build; the
aarch64 environment is created once per machine (about 2 minutes) and reused.
"""

import glob
import json
from pathlib import Path

import pytest
import yaml

from conftest import DIGITS, read_report, run_cli, write_pipeline
from edgekd.data.datasets import Splits
from edgekd.errors import ConfigError
from edgekd.runtimes import aarch64
from edgekd.targets.profiles import EMULATED_CPUS, load_profile


def _artifacts(run_dir: Path) -> list[tuple[str, str]]:
    found = []
    for name in ("student_fp32.onnx", "student_int8.onnx", "student_fp32.tflite", "student_int8.tflite",
                 "teacher_fp32.onnx"):
        path = glob.glob(str(run_dir / "stages" / "*" / name))[0]
        found.append((path, "tflite" if name.endswith(".tflite") else "onnxruntime"))
    return found


@pytest.fixture(scope="module")
def env():
    return aarch64.ensure_env(lambda msg: None)


# ---------------------------------------------------------------------------------------------- profiles

def test_profiles_name_the_cpus_to_emulate(tmp_path):
    assert set(aarch64.CPUS) == set(EMULATED_CPUS)
    assert load_profile("android-arm64").emulate_cpus == ["cortex-a76", "cortex-a53"]
    assert load_profile("raspberry-pi-5").emulate_cpus == ["cortex-a76"]
    assert load_profile("android-arm64-v8.0").emulate_cpus == ["cortex-a53"]
    assert load_profile("x86-64").emulate_cpus == []
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"name": "typo", "cpu_arch": "arm64", "emulate_cpus": ["cortex-a67"]}))
    with pytest.raises(ConfigError, match=r"emulate_cpus\[0\]: unknown CPU 'cortex-a67' \(did you mean 'cortex-a76'\?\)"):
        load_profile(str(typo))
    x86 = tmp_path / "x86.yaml"
    x86.write_text(yaml.safe_dump({"name": "x86", "cpu_arch": "x86_64", "emulate_cpus": ["cortex-a76"]}))
    with pytest.raises(ConfigError, match="emulation runs aarch64 runtimes"):
        load_profile(str(x86))


def test_the_arm_int8_scheme_is_the_targets_not_the_hosts():
    """android-arm64's int8 ONNX is S8S8 without reduce_range whatever the host's kernels prefer."""
    from edgekd.config import QuantizeConfig
    from edgekd.quantize.ptq import quant_scheme

    for name in ("android-arm64", "android-arm64-v8.0", "raspberry-pi-5"):
        assert quant_scheme(QuantizeConfig(), load_profile(name).quantization) == ("int8", True, False), name


# ---------------------------------------------------------------------------------------------- the runner

def test_each_emulated_cpu_sees_its_own_cpuinfo(env):
    a76 = (aarch64.cpu_view(env, "cortex-a76") / "proc" / "cpuinfo").read_text()
    a53 = (aarch64.cpu_view(env, "cortex-a53") / "proc" / "cpuinfo").read_text()
    assert "CPU part\t: 0xd0b" in a76 and " asimddp" in a76  # dot product: the int8 kernels use sdot
    assert "CPU part\t: 0xd03" in a53 and "asimddp" not in a53
    assert env.versions["machine"] == "aarch64"
    assert env.versions["onnxruntime"] == __import__("onnxruntime").__version__


def test_instruction_counts_repeat_exactly_and_differ_by_cpu(env, digits_run):
    models = _artifacts(digits_run)
    x1 = Splits.load(digits_run / "stages" / "data" / "splits.npz").x_test[:1]
    first = aarch64.count_instructions(env, ["cortex-a76", "cortex-a53"], models, x1)
    again = aarch64.count_instructions(env, ["cortex-a76", "cortex-a53"], models, x1)
    assert first == again
    int8_tflite = first[models[3][0]]
    assert int8_tflite["cortex-a53"] != int8_tflite["cortex-a76"]  # no dot product on the A53
    # a model's count does not depend on what else ran in the process
    alone = aarch64.count_instructions(env, ["cortex-a76"], [models[1]], x1)
    assert alone[models[1][0]]["cortex-a76"] == first[models[1][0]]["cortex-a76"]
    # and the build stored the same numbers
    report = read_report(digits_run)
    stored = {a["name"]: {c["cpu"]: c["per_inference"] for c in a["arm_instructions"]} for a in report["artifacts"]}
    assert stored["student_int8.onnx"] == first[models[1][0]]
    assert {c["cpu"]: c["per_inference"] for c in report["teacher"]["arm_instructions"]} == first[models[4][0]]


def test_accuracy_in_the_report_is_the_emulated_targets(env, digits_run):
    report = read_report(digits_run)
    splits = Splits.load(digits_run / "stages" / "data" / "splits.npz")
    assert report["target_arithmetic"]["emulated_cpu"] == "cortex-a76"
    assert report["target_arithmetic"]["samples"] == len(splits.y_test)
    models = dict((Path(p).name, (p, r)) for p, r in _artifacts(digits_run))
    logits = aarch64.predict(env, "cortex-a76", [models["student_int8.onnx"]], splits.x_test)
    acc = float((logits[models["student_int8.onnx"][0]]["logits"].argmax(1) == splits.y_test).mean())
    art = {a["name"]: a for a in report["artifacts"]}
    for name, a in art.items():
        where = a["accuracy_measured_on"]
        assert where["architecture"] == "aarch64" and where["emulated_cpu"] == "cortex-a76", name
        assert where["runtime_version"] == report["runtime_versions"][a["runtime"]]
        assert a["host_accuracy"] is not None and a["host_target_top1_disagreements"] is not None
    assert art["student_int8.onnx"]["accuracy"] == acc
    md = (digits_run / "report.md").read_text()
    assert "## Target arithmetic (aarch64)" in md and "instructions / inference (cortex-a53)" in md
    assert "Target arithmetic (aarch64)" in (digits_run / "report.html").read_text()


# ---------------------------------------------------------------------------------------------- gate and config

def test_gate_on_instruction_counts(digits_run, tmp_path):
    report = read_report(digits_run)
    counts = {c["cpu"]: c["per_inference"] for a in report["artifacts"] if a["name"] == "student_int8.tflite"
              for c in a["arm_instructions"]}
    limit = min(counts.values()) - 1  # one instruction under the A76 and A53 counts: fails on both
    tight = write_pipeline(tmp_path / "tight.yaml", budget={"per_artifact": {"student_int8.tflite": {
        "max_arm_instructions": limit, "max_arm_instructions_ratio_vs_teacher": 1.0}}})
    proc = run_cli("gate", digits_run, "--pipeline", tight, "--json")
    assert proc.returncode == 1, proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    for cpu in ("cortex-a76", "cortex-a53"):
        assert not checks[f"arm_instructions@{cpu}[student_int8.tflite]"]["passed"]
        assert checks[f"arm_instructions@{cpu}[student_int8.tflite]"]["value"] == counts[cpu]
        assert checks[f"arm_instructions_ratio_vs_teacher@{cpu}[student_int8.tflite]"]["passed"]
    roomy = write_pipeline(tmp_path / "roomy.yaml", budget={"max_arm_instructions": max(counts.values()) * 10})
    assert run_cli("gate", digits_run, "--pipeline", roomy).returncode == 0


def test_target_samples_caps_the_emulated_split(digits_copy, tmp_path):
    pipeline = write_pipeline(tmp_path / "capped.yaml", evaluate={"target_samples": 60})
    proc = run_cli("build", "--pipeline", pipeline, "--run-dir", digits_copy)
    assert proc.returncode in (0, 1), proc.stderr
    report = read_report(digits_copy)
    assert report["target_arithmetic"]["samples"] == 60 and report["target_arithmetic"]["subset_seed"] == 0
    ran = {s["name"]: s["status"] for s in report["stages"]}
    assert ran["evaluate"] == "ran" and ran["distill"] == "cached" and ran["arm_instructions"] == "cached"
    for a in report["artifacts"]:
        assert a["accuracy_samples"] == 60 and 0.0 <= a["teacher_accuracy_same_samples"] <= 1.0
        drop = [c for c in report["gate"]["checks"] if c["name"] == f"accuracy_drop[{a['name']}]"][0]
        assert drop["value"] == pytest.approx(a["teacher_accuracy_same_samples"] - a["accuracy"])


def test_no_emulator_is_one_line(digits_copy, tmp_path):
    """Without Debian's qemu-user on PATH the evaluate stage fails with one line naming what to install; the
    artifacts already built stay."""
    before = sorted(p.name for p in (digits_copy / "stages").glob("*/*.onnx"))
    proc = run_cli("build", "--pipeline", DIGITS, "--run-dir", digits_copy, "--only", "evaluate",
                   env={"PATH": str(tmp_path)})
    assert proc.returncode == 2
    # (LiteRT's own banner from the host evaluation that ran first is not edgekd's output)
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("INFO: Created TensorFlow Lite")]
    assert len(lines) == 1 and "qemu-aarch64 not found" in lines[0] and "qemu-user" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (digits_copy / "stages").glob("*/*.onnx")) == before
