"""Target profiles, execution-provider placement, runtime environments and the adb device runner.

Fast tests use edgekd's own onnxruntime (CPU only) and small models built here. The slow ones create the QNN
runtime environment from scratch (onnxruntime-qnn with the HTP simulator, from the package index) and build the
digits pipeline for android-npu-qnn.
"""

import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import DIGITS, REPO, read_report, run_cli
from edgekd.config import BudgetConfig
from edgekd.errors import ConfigError, EdgekdError
from edgekd.targets.profiles import available_profiles, load_profile

SHIPPED = {"android-arm64", "android-arm64-v8.0", "android-npu-qnn", "android-nnapi", "ios-coreml", "raspberry-pi-5",
           "x86-64"}


# ---------------------------------------------------------------------------------------------- small models

def _classifier(path: Path, extra_op: str | None = None, batch="batch") -> Path:
    """Conv -> Relu [-> extra_op] -> Flatten -> Gemm on (batch, 1, 8, 8): a 10-class classifier."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 1, 3, 3)) * 0.5).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((10, 256)) * 0.1).astype(np.float32), "wf"),
             numpy_helper.from_array(np.zeros(10, np.float32), "bf")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"])]
    prev = "r"
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["r"], ["e"]))
        prev = "e"
    nodes += [helper.make_node("Flatten", [prev], ["f"]),
              helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _write_profile(tmp_path: Path, **fields) -> Path:
    path = tmp_path / f"{fields.get('name', 'mine')}.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


# ---------------------------------------------------------------------------------------------- profiles

def test_shipped_profiles_say_what_the_target_runs():
    assert SHIPPED <= set(available_profiles())
    qnn = load_profile("android-npu-qnn")
    assert qnn.execution_provider == "QNNExecutionProvider" and qnn.runtime_env == "qnn"
    assert qnn.provider_options["soc_model"] == "57" and "SM8650" in qnn.soc
    assert qnn.static_shapes and qnn.static_batch_size == 1 and qnn.effective_placement_check == "session"
    assert qnn.quantization.activation_type in ("uint8", "uint16") and qnn.quantization.recipe == "qnn"
    assert qnn.min_accelerator_node_fraction == 0.9
    nnapi, coreml = load_profile("android-nnapi"), load_profile("ios-coreml")
    assert nnapi.effective_placement_check == coreml.effective_placement_check == "mobile-usability"
    assert nnapi.mobile_checker == "nnapi" and coreml.mobile_checker == "coreml-mlprogram"
    assert coreml.accelerator_artifacts == ["student_fp32.onnx"]  # CoreML takes no Q/DQ
    arm = load_profile("android-arm64")
    assert not arm.uses_accelerator and arm.device_runner.enabled
    # which artifacts go through the EP
    built = [("student_fp32.onnx", "onnx", "fp32"), ("student_int8.onnx", "onnx", "int8"),
             ("student_int8.tflite", "tflite", "int8")]
    assert qnn.ep_artifacts(built) == ["student_int8.onnx"] and arm.ep_artifacts(built) == []


def test_devices_cli_lists_and_shows_profiles():
    proc = run_cli("devices")
    assert proc.returncode == 0, proc.stderr
    assert {line.split()[0] for line in proc.stdout.splitlines() if line.strip()} >= SHIPPED
    show = run_cli("devices", "show", "android-npu-qnn")
    assert show.returncode == 0, show.stderr
    shown = yaml.safe_load(show.stdout)
    assert shown["execution_provider"] == "QNNExecutionProvider" and shown["provider_options"]["soc_model"] == "57"
    assert "# host measurements: onnxruntime without NchwcTransformer (from cpu_arch)" in show.stdout


@pytest.mark.parametrize("fields, needle", [
    ({"execution_provider": "QnnExecutionProvider"}, "did you mean 'QNNExecutionProvider'?"),
    ({"execution_provider": "QNNExecutionProvider", "runtimes": ["onnxruntime"], "runtime_env": "qnn",
      "static_shapes": True, "soc": "x"}, "provider_options.soc_model: QNN's HTP backend needs the SoC model"),
    ({"execution_provider": "QNNExecutionProvider", "provider_options": {"soc_model": "57"}, "static_shapes": True,
      "soc": "x"}, "runtime_env: QNNExecutionProvider is not in edgekd's own onnxruntime"),
    ({"execution_provider": "QNNExecutionProvider", "provider_options": {"soc_model": "57"}, "runtime_env": "qnn",
      "soc": "x"}, "static_shapes: must be true for QNNExecutionProvider"),
    ({"execution_provider": "NnapiExecutionProvider", "placement_check": "session"},
     "silently runs on CPU"),
    ({"execution_provider": "NnapiExecutionProvider", "min_accelerator_node_fraction": 1.5},
     "min_accelerator_node_fraction: must be in (0, 1]"),
    ({"min_accelerator_node_fraction": 0.5}, "needs an accelerator execution provider"),
    ({"runtime_env": "qn"}, "unknown runtime environment 'qn' (did you mean 'qnn'?)"),
    ({"execution_provider": "NnapiExecutionProvider", "accelerator_artifacts": ["student_int8.tflite"]},
     "accelerator_artifacts[0]: 'student_int8.tflite': execution providers run ONNX files"),
    ({"device_runner": {"serail": "abc"}}, "device_runner.serail: unknown key (did you mean 'serial'?)"),
    ({"provider_options": {"soc_model": [57]}}, "provider_options.soc_model: expected a string or number"),
    ({"quantization": {"weight_type": "uint8"}}, "uint8 weights are asymmetric"),
    ({"quantization": {"activation_type": "int4"}}, "'int4' is not one of"),
    ({"execution_provider": "CoreMLExecutionProvider", "mobile_checker": "nnapi"}, "'nnapi' does not check"),
    ({"static_batch_size": 0}, "static_batch_size: must be >= 1"),
])
def test_a_users_profile_is_validated_with_one_clear_line(tmp_path, fields, needle):
    path = _write_profile(tmp_path, **fields)
    with pytest.raises(ConfigError) as err:
        load_profile(str(path))
    msg = str(err.value)
    assert needle in msg and str(path) in msg and "\n" not in msg, msg


def test_a_users_profile_file_works_like_a_shipped_one(tmp_path):
    path = _write_profile(tmp_path, name="my-npu", execution_provider="QNNExecutionProvider",
                          runtimes=["onnxruntime"], runtime_env="qnn", soc="Snapdragon 8 Elite (SM8750)",
                          provider_options={"soc_model": 69, "htp_performance_mode": "burst"}, static_shapes=True)
    p = load_profile(str(path))
    assert p.name == "my-npu" and p.provider_options == {"soc_model": "69", "htp_performance_mode": "burst"}
    assert run_cli("devices", "show", path).returncode == 0
    missing = run_cli("build", "--target", tmp_path / "nope.yaml", "--pipeline", DIGITS)
    assert missing.returncode == 2 and "target profile file not found" in missing.stderr


# ---------------------------------------------------------------------------------------------- the target's graph

def test_an_arm_profile_is_measured_on_the_graph_arm_onnxruntime_runs(digits_run, tmp_path):
    """ARM profiles turn off ORT's x86-only NCHWc layout when measuring on this host; the benchmark stage records it,
    and the graph ORT then runs really has no NCHWc nodes (on an x86 host with AVX2/AVX-512 the default one has)."""
    import platform

    from edgekd.runtimes.ort_runner import optimized_op_types

    assert load_profile("android-arm64").host_disabled_optimizers == ["NchwcTransformer"]
    assert load_profile("raspberry-pi-5").host_disabled_optimizers == ["NchwcTransformer"]
    assert load_profile("x86-64").host_disabled_optimizers == []
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "devices" / "android-arm64.yaml").read_text()),
                                   "name": "own", "onnxruntime_disabled_optimizers": []}))
    assert load_profile(str(own)).host_disabled_optimizers == []  # a profile may say its runtime has them all

    bench = read_report(digits_run)["benchmark"]
    assert bench["onnxruntime_disabled_optimizers"] == ["NchwcTransformer"]
    assert "without NchwcTransformer" in bench["measured_on"]
    model = digits_run / "stages" / "export_onnx" / "student_fp32.onnx"
    arm_graph = optimized_op_types(model, tmp_path, disabled_optimizers=["NchwcTransformer"])
    assert not [op for op in arm_graph if "Nchwc" in op or op.startswith("Reorder")], arm_graph
    assert "FusedConv" in arm_graph or "Conv" in arm_graph
    if platform.machine() in ("x86_64", "AMD64"):
        native = optimized_op_types(model, tmp_path)
        assert any(op.startswith("Reorder") for op in native), native  # what the ARM graph leaves out


# ---------------------------------------------------------------------------------------------- static shapes

def test_static_copy_fixes_every_shape(tmp_path):
    import onnx
    from onnxruntime.tools.onnx_model_utils import is_fixed_size_tensor

    from edgekd.errors import StageError
    from edgekd.export.static_shape import make_static_copy

    src = _classifier(tmp_path / "m.onnx")
    info = make_static_copy(src, tmp_path / "s.onnx", batch=4)
    m = onnx.load(str(tmp_path / "s.onnx"))
    assert info["input_shapes"] == {"input": [4, 1, 8, 8]}
    assert all(is_fixed_size_tensor(v) for v in [*m.graph.input, *m.graph.output, *m.graph.value_info])
    assert [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim] == [4, 10]
    fixed = _classifier(tmp_path / "b2.onnx", batch=2)
    with pytest.raises(StageError, match="fixed batch 2, not the profile's static_batch_size 1"):
        make_static_copy(fixed, tmp_path / "x.onnx", batch=1)


# ---------------------------------------------------------------------------------------------- placement

def _gate(accel: dict, teacher_acc=0.99):
    from edgekd.stages.gate import evaluate_budget

    evaluation = {"teacher": {"accuracy": teacher_acc, "params": 1000}, "student_params": 100, "artifacts": {}}
    return evaluate_budget(BudgetConfig(required_artifacts=[]), evaluation, {"results": {}, "accelerator": accel})


def test_placement_check_catches_a_silent_cpu_fallback(tmp_path):
    """Ask for NNAPI the usual way (providers=[...]) on the PyPI onnxruntime: the session is created without an
    error and runs, but on the CPU. The placement read from onnxruntime's profile says 0 nodes on NNAPI, and the
    gate fails naming the ops that ran on the CPU instead."""
    from edgekd.runtimes.accelerator import run_worker_in

    model = _classifier(tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32))
    spec = {"path": str(model), "runtime": "onnxruntime", "threads": 1, "warmup": 2, "runs": 5,
            "input_npy": str(tmp_path / "x.npy"), "work_dir": str(tmp_path),
            "ep": {"name": "NnapiExecutionProvider", "options": {}, "legacy_providers": True}}
    r = run_worker_in(sys.executable, spec)
    p = r["placement"]
    assert r["latency_ms"]["p50"] > 0  # it ran...
    assert p["nodes_on_provider"] == 0 and p["fraction_on_provider"] == 0.0  # ...entirely on the CPU
    assert p["nodes_total"] >= 2 and p["profile"]["kernels_executed"].get("CPUExecutionProvider", 0) >= 2
    assert set(p["ops_elsewhere"]) >= {"Gemm"}
    gate = _gate({"execution_provider": "NnapiExecutionProvider", "min_node_fraction": 0.9,
                  "artifacts": {"student_int8.onnx": {"placement": p}}})
    check = next(c for c in gate["checks"] if c["name"] == "accelerator_placement[student_int8.onnx]")
    assert gate["passed"] is False and check["passed"] is False and check["value"] == 0.0
    assert "not on it:" in check["note"] and "Gemm" in check["note"]


def test_placement_counts_nodes_from_the_profile(tmp_path):
    from edgekd.runtimes.ort_ep import make_session, placement

    model = _classifier(tmp_path / "m.onnx")
    s = make_session(str(model), 1, None, profile_prefix=str(tmp_path / "prof"))
    s.run(None, {"input": np.zeros((3, 1, 8, 8), np.float32)})
    p = placement(s, s.end_profiling(), "CPUExecutionProvider")
    assert p["fraction_on_provider"] == 1.0 and p["nodes_elsewhere"] == 0 and p["nodes_total"] >= 2


def test_mobile_usability_coverage_and_the_gate(tmp_path):
    """NNAPI takes the whole static int8 QDQ model; CoreML takes no QuantizeLinear/DequantizeLinear, so its
    coverage is low and the gate fails listing those ops."""
    from edgekd.export.static_shape import make_static_copy
    from edgekd.quantize.ptq import quantize_qdq
    from edgekd.runtimes.mobile_usability import mobile_placement

    fp32 = _classifier(tmp_path / "fp32.onnx")
    int8 = tmp_path / "int8.onnx"
    quantize_qdq(fp32, int8, np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32),
                 activation_type="uint8")
    dynamic = mobile_placement(int8, "nnapi")
    assert dynamic["nodes_unsupported_due_to_dynamic_shape"] > 0  # NNAPI takes no dynamic shapes
    make_static_copy(int8, tmp_path / "static.onnx", 1)
    nnapi = mobile_placement(tmp_path / "static.onnx", "nnapi")
    assert nnapi["fraction_on_provider"] == 1.0 and nnapi["partitions"] == 1
    coreml = mobile_placement(tmp_path / "static.onnx", "coreml-mlprogram")
    assert coreml["fraction_on_provider"] < 0.5 and "ai.onnx:QuantizeLinear" in coreml["unsupported_ops"]
    gate = _gate({"execution_provider": "CoreMLExecutionProvider", "min_node_fraction": 0.9,
                  "artifacts": {"student_int8.onnx": {"placement": coreml}}})
    check = next(c for c in gate["checks"] if c["name"].startswith("accelerator_placement"))
    assert not check["passed"] and "QuantizeLinear" in check["note"] and "DequantizeLinear" in check["note"]
    ok = _gate({"execution_provider": "NnapiExecutionProvider", "min_node_fraction": 0.9,
                "artifacts": {"student_int8.onnx": {"placement": nnapi}}})
    assert ok["passed"] is True


def test_accuracy_through_the_ep_is_gated():
    accel = {"execution_provider": "QNNExecutionProvider", "min_node_fraction": None,
             "artifacts": {"student_int8.onnx": {"placement": {"fraction_on_provider": 1.0}, "accuracy": 0.5,
                                                 "samples": 100}}}
    gate = _gate(accel)
    check = next(c for c in gate["checks"] if c["name"] == "accelerator_accuracy_drop[student_int8.onnx]")
    assert not check["passed"] and abs(check["value"] - 0.49) < 1e-9


# ---------------------------------------------------------------------------------------------- environments

def test_runtime_env_location_and_key(tmp_path, monkeypatch):
    from edgekd.runtimes import envs

    monkeypatch.setenv("EDGEKD_ENV_DIR", str(tmp_path / "envs"))
    d = envs.env_dir("qnn")
    assert d.parent == tmp_path / "envs" and d.name.startswith("qnn-") and len(d.name) == len("qnn-") + 12
    spec = envs.ENVS["qnn"]
    assert "onnxruntime-qnn==2.7.0" in spec.requirements
    assert all("==" in r for r in spec.requirements)  # exact pins: the hash names exactly one environment
    changed = envs.EnvSpec(spec.name, spec.requirements + ("extra==1",), spec.check, spec.platforms, "")
    assert envs.env_key(changed) != envs.env_key(spec)
    monkeypatch.delenv("EDGEKD_ENV_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert envs.env_root() == tmp_path / "cache" / "edgekd" / "envs"
    assert envs.ensure_env("host")["python"] == sys.executable
    with pytest.raises(EdgekdError, match="unknown runtime environment 'nope'"):
        envs.ensure_env("nope")
    monkeypatch.setattr(envs.platform, "machine", lambda: "aarch64")
    with pytest.raises(EdgekdError, match="can only be built on Linux/x86_64"):
        envs.ensure_env("qnn")


# ---------------------------------------------------------------------------------------------- adb

def _fake_adb(tmp_path: Path, devices: str, bench_out: str = "") -> Path:
    """A stand-in `adb` (a shell script) that answers like platform-tools does, for testing the runner's flow."""
    script = tmp_path / "bin" / "adb"
    script.parent.mkdir(exist_ok=True)
    (tmp_path / "bench.txt").write_text(bench_out)
    script.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/adb.log
case "$1" in
  devices) printf 'List of devices attached\\n{devices}\\n' ;;
  -s) shift 2
      case "$1" in
        push) echo "1 file pushed" ;;
        shell) case "$2" in
                 getprop) case "$3" in ro.product.model) echo Pixel-Test ;; ro.product.cpu.abi) echo arm64-v8a ;;
                          *) echo ;; esac ;;
                 *benchmark_model*|*onnxruntime_perf_test*) cat {tmp_path}/bench.txt ;;
                 *) ;;
               esac ;;
      esac ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


TFLITE_OUT = """STARTING!
Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=412 curr=301 min=288 max=512 avg=310.5 std=22
Inference timings in us: Init: 3517, First inference: 6590, Warmup (avg): 452.5, Inference (avg): 310.5
Memory footprint delta from the start of the tool (MB): init=2.97 overall=10.73
"""
ORT_OUT = """Session creation time cost: 0.0123 s
First inference time cost: 2 ms
Average inference time cost: 0.41 ms
Peak working set size: 12345678 bytes
Min Latency: 0.00031 s
Max Latency: 0.0009 s
P50 Latency: 0.0004 s
P90 Latency: 0.00052 s
P95 Latency: 0.0006 s
P99 Latency: 0.00081 s
"""


def test_device_runner_without_adb_or_device_says_so_and_goes_on(tmp_path, monkeypatch):
    from edgekd.runtimes.adb import device_runs

    prof = load_profile("android-arm64")
    monkeypatch.delenv("EDGEKD_ADB", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = device_runs(prof, [("m.tflite", tmp_path / "m.tflite", "tflite")], 4, log=lambda m: None)
    assert r["status"] == "no-adb" and "adb not found" in r["message"]
    monkeypatch.setenv("EDGEKD_ADB", str(_fake_adb(tmp_path, devices="")))
    r = device_runs(prof, [("m.tflite", tmp_path / "m.tflite", "tflite")], 4, log=lambda m: None)
    assert r["status"] == "no-device" and "no device connected" in r["message"]


def test_device_runner_pushes_and_parses_the_benchmark_tools(tmp_path, monkeypatch):
    from edgekd.runtimes.adb import device_runs, parse_ort_perf_test

    model = tmp_path / "student_int8.tflite"
    model.write_bytes(b"tflite")
    tool = tmp_path / "benchmark_model"
    tool.write_bytes(b"\x7fELF")
    monkeypatch.setenv("EDGEKD_ADB", str(_fake_adb(tmp_path, "R5CT1234\tdevice", TFLITE_OUT)))
    monkeypatch.setenv("EDGEKD_TFLITE_BENCHMARK_MODEL", str(tool))
    monkeypatch.delenv("EDGEKD_ORT_PERF_TEST", raising=False)
    r = device_runs(load_profile("android-arm64"), [("student_int8.tflite", model, "tflite"),
                                                     ("student_int8.onnx", model, "onnxruntime")], 4,
                    log=lambda m: None)
    assert r["status"] == "measured" and r["device"]["model"] == "Pixel-Test"
    t = r["results"]["student_int8.tflite"]
    assert t["status"] == "measured" and "--num_threads=4" in t["command"]
    assert t["latency_ms"]["mean"] == pytest.approx(0.3105) and t["load_ms"] == pytest.approx(3.517)
    assert t["first_ms"] == pytest.approx(6.59) and t["latency_ms"]["std"] == pytest.approx(0.022)
    assert r["results"]["student_int8.onnx"]["status"] == "not-measured"  # no perf_test binary given
    log = (tmp_path / "adb.log").read_text()
    assert "push" in log and "/data/local/tmp/edgekd/student_int8.tflite" in log
    o = parse_ort_perf_test(ORT_OUT)
    assert o["latency_ms"]["p50"] == pytest.approx(0.4) and o["latency_ms"]["p99"] == pytest.approx(0.81)
    assert o["load_ms"] == pytest.approx(12.3) and o["peak_rss_bytes"] == 12345678


# ---------------------------------------------------------------------------------------------- QNN (slow)

@pytest.fixture(scope="session")
def qnn_env(tmp_path_factory):
    """The QNN runtime environment, created from scratch by edgekd (onnxruntime-qnn from the package index)."""
    from edgekd.runtimes.envs import ensure_env

    root = tmp_path_factory.mktemp("envs")
    before = os.environ.get("EDGEKD_ENV_DIR")
    os.environ["EDGEKD_ENV_DIR"] = str(root)  # a fresh place: the environment is created from scratch
    t0 = time.perf_counter()
    info = ensure_env("qnn", log=print)
    print(f"QNN runtime environment created from scratch in {time.perf_counter() - t0:.1f} s")
    assert info["created"] is True and Path(info["python"]).exists()
    again = ensure_env("qnn", log=print)
    assert again["created"] is False and again["python"] == info["python"]
    yield info
    if before is None:
        os.environ.pop("EDGEKD_ENV_DIR", None)
    else:
        os.environ["EDGEKD_ENV_DIR"] = before


@pytest.mark.slow
def test_qnn_build_reports_placement_accuracy_and_context_model(qnn_env, digits_copy):
    t0 = time.perf_counter()
    proc = run_cli("build", "--target", "android-npu-qnn", "--pipeline", DIGITS, "--run-dir", digits_copy)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    print(f"edgekd build --target android-npu-qnn (training cached): {time.perf_counter() - t0:.0f} s")
    r = read_report(digits_copy)
    assert r["target"] == "android-npu-qnn"
    accel = r["accelerator"]
    assert accel["execution_provider"] == "QNNExecutionProvider" and accel["runtime_env"]["name"] == "qnn"
    assert accel["runtime_env"]["versions"]["onnxruntime-qnn"] == "2.7.0"
    assert "simulator" in accel["latency_note"] and "NOT a device latency" in accel["latency_note"]
    a = next(a for a in r["artifacts"] if a["name"] == "student_int8.onnx")
    e, p = a["accelerator"], a["accelerator"]["placement"]
    assert p["provider"] == "QNNExecutionProvider" and "graph-assignment" in p["source"]
    assert p["nodes_on_provider"] + p["nodes_elsewhere"] == p["nodes_total"] and p["partitions"] >= 1
    assert p["fraction_on_provider"] >= 0.9 and a["accelerator_node_fraction"] == p["fraction_on_provider"]
    assert {"Conv", "Gemm"} <= set(p["ops_on_provider"])
    assert e["samples"] == r["dataset"]["test"] and e["accuracy"] > 0.85
    assert e["agreement_with_cpu_ep"] >= 0.97
    ctx = digits_copy / "stages" / "benchmark" / e["context_model"]["file"]
    assert ctx.is_file() and e["context_model"]["max_abs_diff_vs_compiled_session"] < 1e-6
    import onnx

    assert any(n.op_type == "EPContext" for n in onnx.load(str(ctx)).graph.node)
    names = {c["name"]: c for c in r["gate"]["checks"]}
    assert names["accelerator_placement[student_int8.onnx]"]["passed"]
    assert names["accelerator_accuracy_drop[student_int8.onnx]"]["passed"]
    assert r["gate"]["passed"] is True
    assert r["device_runner"]["status"] in ("no-adb", "no-device", "measured")
    md = (digits_copy / "report.md").read_text()
    assert "## Execution provider: QNNExecutionProvider" in md and "NOT a device latency" in md


@pytest.mark.slow
def test_qnn_placement_catches_an_op_the_htp_does_not_take(qnn_env, tmp_path):
    """Erf is not taken by QNN's HTP: the session runs, get_providers() still names QNN first, and the placement
    (onnxruntime's own record) shows Erf on the CPU; below the profile's minimum the gate fails naming it."""
    from edgekd.runtimes.accelerator import measure_accelerator

    model = _classifier(tmp_path / "erf.onnx", extra_op="Erf")
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    y = np.arange(20) % 10
    profile = load_profile(str(_write_profile(
        tmp_path, name="strict-npu", execution_provider="QNNExecutionProvider", runtimes=["onnxruntime"],
        runtime_env="qnn", soc="Snapdragon 8 Gen 3 (SM8650)", provider_options={"soc_model": "57"},
        static_shapes=True, min_accelerator_node_fraction=0.95)))
    accel = measure_accelerator(profile, [("erf_model.onnx", model)], tmp_path / "out", x, y, 2, 5, 1, print)
    p = accel["artifacts"]["erf_model.onnx"]["placement"]
    assert p["providers_claimed_by_session"][0] == "QNNExecutionProvider"  # what get_providers() says
    assert p["ops_elsewhere"].get("Erf") == 1 and p["fraction_on_provider"] < 0.95
    assert "Erf" in p["profile"]["cpu_kernels"]  # and it really executed on the CPU
    gate = _gate(accel)
    check = next(c for c in gate["checks"] if c["name"] == "accelerator_placement[erf_model.onnx]")
    assert gate["passed"] is False and not check["passed"] and "Erf x1" in check["note"]


@pytest.mark.parametrize("profile, depends", [("android-arm64", False), ("android-npu-qnn", False),
                                              ("x86-64", True)])
def test_int8_cache_key_depends_on_the_hosts_vnni_only_where_it_decides_the_scheme(monkeypatch, profile, depends):
    """An ARM/NPU profile names its activation type: its int8 ONNX model is the same on any host, so moving a run dir
    to a machine without VNNI must not re-quantize (and re-judge) it. x86-64's 'auto' does follow the host."""
    from edgekd.config import load_pipeline
    from edgekd.quantize import ptq
    from edgekd.stages.qat import QATStage
    from edgekd.stages.quantize import QuantizeStage

    cfg, target = load_pipeline(DIGITS), load_profile(profile)
    for stage in (QuantizeStage(), QATStage()):
        keys = []
        for vnni in (True, False):
            monkeypatch.setattr(ptq, "has_vnni", lambda v=vnni: v)
            keys.append(stage.extra_key(cfg, target))
        assert (keys[0] != keys[1]) is depends, (stage.name, keys)


@pytest.mark.parametrize("profile, vnni, warned", [("android-arm64", False, True), ("android-arm64", True, False),
                                                   ("x86-64", False, False)])
def test_host_int8_accuracy_for_an_arm_target_is_flagged_on_a_host_without_vnni(monkeypatch, profile, vnni, warned):
    """With evaluate.emulate off, an ARM target's int8 ONNX accuracy is the host's; on x86 without VNNI that figure
    is not the phone's (S8S8 saturation), and the report says so beside it."""
    import platform
    from types import SimpleNamespace

    from edgekd.config import load_pipeline
    from edgekd.quantize import ptq
    from edgekd.stages.evaluate import _host_arithmetic_caveat

    monkeypatch.setattr(ptq, "has_vnni", lambda: vnni)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    caveat = _host_arithmetic_caveat(SimpleNamespace(cfg=load_pipeline(DIGITS), target=load_profile(profile)))
    assert (caveat is not None) is warned
    if warned:
        assert "without VNNI" in caveat and "cortex" in caveat.lower() and "evaluate.emulate" in caveat
