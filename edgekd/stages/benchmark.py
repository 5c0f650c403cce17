"""benchmark: latency and memory of every artifact and of the teacher, each in its own process, under the profile.

The figures are measured on this host with the profile's thread count; they are labelled so and are never
presented as the target device's latency.

With an execution provider in the target profile, each artifact the EP takes also gets a placement report (nodes
and op types on the EP vs elsewhere, from onnxruntime's own records), and where the EP runs here (QNN's HTP
simulator, in its own runtime environment) the accuracy through it and the precompiled EPContext model
(edgekd/runtimes/accelerator.py). A profile's device runner measures on a real Android device over adb, or says
why it could not (edgekd/runtimes/adb.py).
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgekd.errors import StageError
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.stages.artifacts import collect
from edgekd.stages.common import load_splits
from edgekd.targets.profiles import cpu_model


def run_worker(spec: dict, timeout: float = 600) -> dict:
    """One measurement in a fresh interpreter (isolated RSS, no torch/TF loaded)."""
    proc = subprocess.run([sys.executable, "-m", "edgekd.runtimes.bench_worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise StageError("benchmark", f"measuring {Path(spec['path']).name} failed: "
                                      f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise StageError("benchmark", f"measuring {Path(spec['path']).name} failed: {result['error']}")
    return result


class BenchmarkStage(Stage):
    name = "benchmark"
    deps = ("data", "export_onnx")
    optional_deps = ("quantize", "export_tflite", "quantize_tflite", "qat")
    uses_target = True
    description = "latency and memory under the target profile (host-measured)"

    def config(self, cfg):
        return {"benchmark": cfg.section("benchmark")}

    def extra_key(self, cfg, target):
        # Latency belongs to the machine it was measured on: another host -> measure again.
        return {"host": f"{platform.node()}|{cpu_model()}|{os.cpu_count()}"}

    def run(self, ctx: StageContext) -> dict:
        cfg, target = ctx.cfg.benchmark, ctx.target
        threads = min(target.threads, os.cpu_count() or 1)
        splits = load_splits(ctx)
        disabled = target.host_disabled_optimizers
        measured_on = target.host_measured_label + (f"; {threads} threads" +
                                                    (f" (profile asks {target.threads})" if threads < target.threads
                                                     else "")
                                                    + (f"; onnxruntime without {', '.join(disabled)} (absent on "
                                                       f"{target.cpu_arch})" if disabled else ""))
        jobs = [(a.name, a.path, a.runtime, a.rel_path) for a in collect(ctx) if a.runtime in target.runtimes]
        if cfg.include_teacher:
            jobs.append(("teacher_fp32.onnx", ctx.input_path("export_onnx", "teacher_fp32.onnx"), "onnxruntime",
                         ctx.inputs["export_onnx"].files["teacher_fp32.onnx"]))
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            inputs = Path(tmp) / "input.npy"
            np.save(inputs, splits.x_test[:cfg.batch_size])
            for name, path, runtime, rel in jobs:
                spec = {"path": str(path), "runtime": runtime, "threads": threads, "warmup": cfg.warmup,
                        "runs": cfg.runs, "input_npy": str(inputs),
                        "disabled_optimizers": disabled if runtime == "onnxruntime" else []}
                r = run_worker(spec)
                r.update({"runtime": runtime, "size_bytes": path.stat().st_size, "measured_on": measured_on,
                          "threads": threads})
                results[name] = r
                lat = r["latency_ms"]
                ctx.log(f"{name:22s} {runtime:12s} p50 {lat['p50']:.3f} ms  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}"
                        f"  load {r['load_ms']:.1f} ms  peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
        skipped = [a.name for a in collect(ctx) if a.runtime not in target.runtimes]
        summary = {"measured_on": measured_on, "host_cpu": cpu_model(), "host_arch": platform.machine(),
                   "threads": threads, "batch_size": cfg.batch_size, "results": results,
                   "onnxruntime_disabled_optimizers": disabled,
                   "not_measured": {n: f"runtime not used by target {target.name}" for n in skipped}}
        summary.update(self.accelerator_and_device(ctx, splits, threads))
        return summary

    def accelerator_and_device(self, ctx: StageContext, splits, threads: int) -> dict:
        """The target's execution provider (placement, accuracy, EPContext; edgekd/runtimes/accelerator.py) and
        the optional real-device runner over adb (edgekd/runtimes/adb.py)."""
        from edgekd.runtimes.accelerator import measure_accelerator
        from edgekd.runtimes.adb import device_runs

        cfg, target, arts = ctx.cfg.benchmark, ctx.target, collect(ctx)
        out = {}
        if target.uses_accelerator:
            names = target.ep_artifacts([(a.name, a.format, a.precision) for a in arts])
            paths = {a.name: a.path for a in arts}
            out["accelerator"] = measure_accelerator(target, [(n, paths[n]) for n in names], ctx.out_dir,
                                                     splits.x_test, splits.y_test, cfg.warmup, cfg.runs, threads,
                                                     ctx.log)
            if not names:
                out["accelerator"]["note"] = "none of the artifacts the profile sends to the accelerator was built"
        out["device"] = device_runs(target, [(a.name, a.path, a.runtime) for a in arts
                                             if a.runtime in target.runtimes], target.threads, ctx.log)
        ctx.log(f"device runner: {out['device']['message']}")
        return out
