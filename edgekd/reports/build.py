"""The report object (schema edgekd.report/1), assembled from stored stage results; rendered by reports.render."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path

from edgekd import __version__
from edgekd.config import to_plain
from edgekd.data.datasets import source_fingerprint
from edgekd.pipeline.engine import StageContext
from edgekd.stages.artifacts import collect
from edgekd.targets.profiles import cpu_model

SCHEMA = "edgekd.report/1"
# Everything that shapes an artifact or a measurement: training, export, conversion, quantization, runtimes.
VERSIONED = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxscript", "onnx2tf", "tensorflow", "tf-keras",
             "ai-edge-litert", "numpy", "protobuf", "scikit-learn", "torchao", "torch-pruning")
# CPU features that change int8 kernels and speed (the quantization scheme follows VNNI on x86).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm", "sve")


def versions() -> dict:
    out = {"edgekd": __version__, "python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def host() -> dict:
    """The machine the benchmark ran on, as far as it decides the numbers."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu_model(), "arch": platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_flags": [f for f in CPU_FLAGS if f in flags], "os": platform.platform(),
            "python": platform.python_version()}


def build_report(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    data, teacher, distill = ctx.input_data("data"), ctx.input_data("teacher"), ctx.input_data("distill")
    evaluation, bench, gate = ctx.input_data("evaluate"), ctx.input_data("benchmark"), ctx.input_data("gate")
    arm = ctx.input_data("arm_instructions")
    measured = bench.get("results", {})
    teacher_bench = measured.get("teacher_fp32.onnx", {})
    artifacts = []
    for art in collect(ctx):
        ev = evaluation.get("artifacts", {}).get(art.name, {})
        m = measured.get(art.name, {})
        artifacts.append({
            "name": art.name, "format": art.format, "precision": art.precision, "path": art.rel_path,
            "size_bytes": art.path.stat().st_size,
            "params": evaluation.get("student_params", distill.get("params")),  # the pruned student's, if pruned
            "accuracy": ev.get("accuracy"), "teacher_agreement": ev.get("teacher_agreement"),
            # which arithmetic computed `accuracy` (the target's, emulated, where the profile names an ARM CPU), and
            # the host's own figure beside it
            "accuracy_measured_on": ev.get("accuracy_measured_on"), "accuracy_samples": ev.get("samples"),
            "host_accuracy": ev.get("host_accuracy", ev.get("accuracy")),
            "host_target_top1_disagreements": ev.get("host_target_top1_disagreements"),
            **({"teacher_accuracy_same_samples": ev["teacher_accuracy_same_samples"]}
               if "teacher_accuracy_same_samples" in ev else {}),
            "arm_instructions": _arm(arm, art.name),
            "runtime": art.runtime,
            **({"converter": art.converter} if art.converter else {}),
            "latency_ms": _lat(m), "load_ms": m.get("load_ms"), "first_inference_ms": m.get("first_ms"),
            "peak_rss_bytes": m.get("peak_rss_bytes"), "measured_on": m.get("measured_on")
            or bench.get("not_measured", {}).get(art.name, "not measured"),
            "latency_distribution_ms": m.get("latency_distribution_ms"),
            "runtime_version": m.get("runtime_version"),
            # filled by an execution-provider placement report; the gate's min_accelerator_node_fraction reads it
            "accelerator_node_fraction": _ep(bench, art.name).get("placement", {}).get("fraction_on_provider"),
            "accelerator": _ep(bench, art.name) or None,
        })
    missing = [name for name in cfg.budget.required_artifacts if name not in {a["name"] for a in artifacts}]
    return {
        "schema": SCHEMA,
        "pipeline": cfg.name,
        "target": ctx.target.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": {"arch": teacher.get("arch"), "params": evaluation.get("teacher", {}).get("params", teacher.get("params")),
                    "accuracy": evaluation.get("teacher", {}).get("accuracy"),
                    "trained_here": teacher.get("trained_here"), "checkpoint": teacher.get("checkpoint"),
                    "latency_ms": _lat(teacher_bench), "runtime_for_latency": "onnxruntime (teacher_fp32.onnx)",
                    "latency_distribution_ms": teacher_bench.get("latency_distribution_ms"),
                    "size_bytes": teacher_bench.get("size_bytes"),
                    "measured_on": teacher_bench.get("measured_on"),
                    "arm_instructions": _arm(arm, "teacher_fp32.onnx"),
                    # with `teachers:`: each teacher's own accuracy, and the ensemble's (= "accuracy" above)
                    **({"members": [{k: v for k, v in m.items() if k != "history"} for m in teacher["members"]],
                        "ensemble": teacher.get("ensemble")} if teacher.get("members") else {})},
        **({"assistant": {k: v for k, v in ctx.input_data("assistant").items() if k != "history"}}
           if ctx.has_input("assistant") else {}),
        "student": {"arch": distill.get("arch"), "params": evaluation.get("student_params", distill.get("params")),
                    "accuracy_torch": evaluation.get("student_torch_accuracy"),
                    "val_accuracy": distill.get("val_accuracy"), "history": distill.get("history"),
                    "distill": {"alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature,
                                "temperature_schedule": cfg.distill.temperature_schedule,
                                "teacher_output_cache": distill.get("teacher_output_cache"),
                                "teacher_output_cache_note": distill.get("teacher_output_cache_note"),
                                "methods": distill.get("methods"), "distilled_from": distill.get("distilled_from"),
                                "train_processes": distill.get("train_processes", 1),
                                "batchnorm_recalibration": distill.get("batchnorm_recalibration")}},
        **({"compression": compression(ctx, evaluation)} if ctx.has_input("prune") or ctx.has_input("qat") else {}),
        "artifacts": artifacts,
        "missing_artifacts": missing,
        "gate": {"passed": bool(gate.get("passed", False)) and not missing, "checks": gate.get("checks", []),
                 "best_artifact": gate.get("best_artifact")},
        "benchmark": {"measured_on": bench.get("measured_on"), "threads": bench.get("threads"),
                      "batch_size": bench.get("batch_size"), "host_cpu": bench.get("host_cpu"),
                      "host_arch": bench.get("host_arch"),
                      "onnxruntime_disabled_optimizers": bench.get("onnxruntime_disabled_optimizers", []),
                      "note": "host-measured latency under the target profile's settings; not a device measurement"},
        "target_arithmetic": evaluation.get("target_arithmetic"),
        "arm_instructions": {k: arm[k] for k in ("cpus", "label", "cpu_descriptions", "emulator", "runtime_versions",
                                                  "note") if k in arm} if arm else None,
        # the target's execution provider (placement, accuracy through it, EPContext) and the adb device runner
        "accelerator": {k: v for k, v in (bench.get("accelerator") or {}).items() if k != "artifacts"} or None,
        "device_runner": bench.get("device"),
        "dataset": {"name": data.get("dataset"), "fingerprint": ctx.inputs["data"].digests.get("splits.npz"),
                    "source_fingerprint": source_fingerprint(cfg.data),
                    "train": data.get("train"), "val": data.get("val"), "test": data.get("test"),
                    "input_shape": data.get("input_shape"), "classes": data.get("classes")},
        "target_profile": ctx.target.as_dict(), "target_profile_hash": ctx.target.digest(),
        "config": to_plain(cfg), "config_hash": cfg.digest(), "config_source": cfg.source,
        "seed": cfg.seed,
        "seeds": {"pipeline": cfg.seed, "split": cfg.seed, "training": f"{cfg.seed} * 1000 + epoch",
                  "calibration": cfg.seed + 1, "parity": cfg.seed},
        "versions": versions(),
        "runtime_versions": {a["runtime"]: a["runtime_version"] for a in artifacts if a.get("runtime_version")},
        "host": host(),
    }


def gate_inputs(report: dict) -> tuple[dict, dict, dict]:
    """The gate's inputs (evaluate summary, benchmark summary, placement), rebuilt from a stored report, so the
    gate can be re-evaluated without rebuilding: `evaluate_budget(budget, *gate_inputs(report))`."""
    teacher, arts = report.get("teacher") or {}, report.get("artifacts") or []
    evaluation = {"teacher": {"accuracy": teacher.get("accuracy"), "params": teacher.get("params")},
                  "student_params": (report.get("student") or {}).get("params"),
                  "artifacts": {a["name"]: {"accuracy": a["accuracy"],
                                            **({"teacher_accuracy_same_samples": a["teacher_accuracy_same_samples"]}
                                               if "teacher_accuracy_same_samples" in a else {})}
                                for a in arts if a.get("accuracy") is not None}}
    results = {a["name"]: {"latency_ms": a["latency_ms"], "size_bytes": a.get("size_bytes"),
                           "peak_rss_bytes": a.get("peak_rss_bytes")} for a in arts if a.get("latency_ms")}
    if teacher.get("latency_ms"):
        results["teacher_fp32.onnx"] = {"latency_ms": teacher["latency_ms"]}
    placement = {a["name"]: a.get("accelerator_node_fraction") for a in arts}
    accel = {**(report.get("accelerator") or {}),
             "artifacts": {a["name"]: a["accelerator"] for a in arts if a.get("accelerator")}}
    counts = {a["name"]: {c["cpu"]: c["per_inference"] for c in a["arm_instructions"]}
              for a in arts if a.get("arm_instructions")}
    if teacher.get("arm_instructions"):
        counts["teacher_fp32.onnx"] = {c["cpu"]: c["per_inference"] for c in teacher["arm_instructions"]}
    return evaluation, {"results": results, "accelerator": accel, "arm_instructions": counts}, placement


def _arm(arm: dict, name: str) -> list[dict] | None:
    """An artifact's emulated instruction counts as [{"cpu", "per_inference"}], one per CPU; None if not counted."""
    per_cpu = (arm.get("results") or {}).get(name)
    return [{"cpu": cpu, "per_inference": n} for cpu, n in per_cpu.items()] if per_cpu else None


def _ep(bench: dict, name: str) -> dict:
    """An artifact's execution-provider record from the benchmark stage (placement, accuracy, EPContext)."""
    return ((bench.get("accelerator") or {}).get("artifacts") or {}).get(name) or {}


def compression(ctx: StageContext, evaluation: dict) -> dict:
    """What pruning and QAT did (params, MACs, accuracy before/after) and post-training vs QAT int8 accuracy."""
    out: dict = {}
    if ctx.has_input("prune"):
        p = dict(ctx.input_data("prune"))
        p["recovery"] = {k: v for k, v in p.get("recovery", {}).items() if k != "history"}
        out["prune"] = p
    if ctx.has_input("qat"):
        out["qat"] = {k: v for k, v in ctx.input_data("qat").items() if k not in ("history", "artifacts")}
        arts = evaluation.get("artifacts", {})
        out["int8_accuracy"] = {
            kind: {n: arts[n]["accuracy"] for n in names if n in arts}
            for kind, names in (("post_training", ("student_int8.onnx", "student_int8.tflite")),
                                ("qat", ("student_qat_int8.onnx", "student_qat_int8.tflite")))}
    return out


def _lat(m: dict) -> dict | None:
    lat = m.get("latency_ms") if m else None
    return {k: lat[k] for k in ("p50", "p90", "p99", "mean", "std")} if lat else None
