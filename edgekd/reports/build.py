"""The report object (schema edgekd.report/1), assembled from stored stage results; rendered by reports.render."""

from __future__ import annotations

import platform
from importlib import metadata

from edgekd import __version__
from edgekd.config import to_plain
from edgekd.pipeline.engine import StageContext
from edgekd.stages.artifacts import collect
from edgekd.targets.profiles import cpu_model

SCHEMA = "edgekd.report/1"
VERSIONED = ("torch", "onnx", "onnxruntime", "onnxsim", "onnx2tf", "tensorflow", "ai-edge-litert", "numpy")


def versions() -> dict:
    out = {"edgekd": __version__, "python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def build_report(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    data, teacher, distill = ctx.input_data("data"), ctx.input_data("teacher"), ctx.input_data("distill")
    evaluation, bench, gate = ctx.input_data("evaluate"), ctx.input_data("benchmark"), ctx.input_data("gate")
    measured = bench.get("results", {})
    teacher_bench = measured.get("teacher_fp32.onnx", {})
    artifacts = []
    for art in collect(ctx):
        ev = evaluation.get("artifacts", {}).get(art.name, {})
        m = measured.get(art.name, {})
        artifacts.append({
            "name": art.name, "format": art.format, "precision": art.precision, "path": art.rel_path,
            "size_bytes": art.path.stat().st_size, "params": distill.get("params"),
            "accuracy": ev.get("accuracy"), "teacher_agreement": ev.get("teacher_agreement"),
            "runtime": art.runtime,
            "latency_ms": _lat(m), "load_ms": m.get("load_ms"), "first_inference_ms": m.get("first_ms"),
            "peak_rss_bytes": m.get("peak_rss_bytes"), "measured_on": m.get("measured_on")
            or bench.get("not_measured", {}).get(art.name, "not measured"),
        })
    missing = [name for name in cfg.budget.required_artifacts if name not in {a["name"] for a in artifacts}]
    return {
        "schema": SCHEMA,
        "pipeline": cfg.name,
        "target": ctx.target.name,
        "teacher": {"arch": teacher.get("arch"), "params": teacher.get("params"),
                    "accuracy": evaluation.get("teacher", {}).get("accuracy"),
                    "trained_here": teacher.get("trained_here"), "checkpoint": teacher.get("checkpoint"),
                    "latency_ms": _lat(teacher_bench), "runtime_for_latency": "onnxruntime (teacher_fp32.onnx)",
                    "measured_on": teacher_bench.get("measured_on")},
        "student": {"arch": distill.get("arch"), "params": distill.get("params"),
                    "accuracy_torch": evaluation.get("student_torch_accuracy"),
                    "val_accuracy": distill.get("val_accuracy"), "history": distill.get("history"),
                    "distill": {"alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature,
                                "temperature_schedule": cfg.distill.temperature_schedule,
                                "teacher_output_cache": distill.get("teacher_output_cache")}},
        "artifacts": artifacts,
        "missing_artifacts": missing,
        "gate": {"passed": bool(gate.get("passed", False)) and not missing, "checks": gate.get("checks", []),
                 "best_artifact": gate.get("best_artifact")},
        "benchmark": {"measured_on": bench.get("measured_on"), "threads": bench.get("threads"),
                      "batch_size": bench.get("batch_size"), "host_cpu": cpu_model(),
                      "host_arch": platform.machine(),
                      "note": "host-measured latency under the target profile's settings; not a device measurement"},
        "dataset": {"name": data.get("dataset"), "fingerprint": ctx.inputs["data"].digests.get("splits.npz"),
                    "train": data.get("train"), "val": data.get("val"), "test": data.get("test"),
                    "input_shape": data.get("input_shape"), "classes": data.get("classes")},
        "target_profile": ctx.target.as_dict(),
        "config": to_plain(cfg), "config_hash": cfg.digest(), "config_source": cfg.source,
        "seed": cfg.seed,
        "versions": versions(),
        "host": {"cpu": cpu_model(), "arch": platform.machine(), "python": platform.python_version()},
    }


def _lat(m: dict) -> dict | None:
    lat = m.get("latency_ms") if m else None
    return {k: lat[k] for k in ("p50", "p90", "p99", "mean", "std")} if lat else None
