"""Measure one model in this (fresh) process and print one JSON line.

Run as `python -m edgekd.runtimes.bench_worker SPEC_JSON`. Only the runtime under test is imported (no torch,
no TensorFlow), so the peak RSS is that of a process serving this model with this runtime.

SPEC: {"path", "runtime": "onnxruntime"|"tflite", "threads", "warmup", "runs", "input_npy"}, optional
"disabled_optimizers" (onnxruntime graph optimizers the target's runtime lacks)
Result: load_ms, first_ms, latency_ms {p50, p90, p99, mean, std, min}, latency_distribution_ms {percentiles, values}
(the sorted samples' quantiles, compact enough for report.json and a distribution plot), runs, runtime_version,
rss_before_load_bytes, peak_rss_bytes.

With an execution provider (SPEC "ep": {"name", "options"}, plus "work_dir", optional "eval_npy"/"eval_out_npy"
and "context_out") `measure_ep` also reads where the nodes ran (edgekd.runtimes.ort_ep), runs the evaluation
inputs through the EP and saves the logits, and writes the EP's precompiled EPContext model. It runs in the EP's
own runtime environment (edgekd.runtimes.envs), which holds only numpy + onnxruntime (+ the EP's package).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from importlib import metadata

# Where the latency distribution is sampled: every 2.5% plus the tail.
DISTRIBUTION_PERCENTILES = [0.0, 1.0] + [i * 2.5 for i in range(1, 40)] + [99.0, 99.5, 100.0]
RUNTIME_DISTS = {"onnxruntime": "onnxruntime", "tflite": "ai-edge-litert"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    """VmHWM: this process's own peak RSS. (getrusage's ru_maxrss survives exec, so it would report the
    parent build process's peak, torch and TensorFlow included.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ep_run_batched(session, name: str, x, batch: int):
    """Logits for all of x through a session whose input has a fixed batch (the last chunk padded)."""
    import numpy as np

    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(session.run(None, {name: np.ascontiguousarray(chunk, dtype=np.float32)})[0][:n])
    return np.concatenate(outs).astype(np.float32)


def measure_ep(spec: dict) -> dict:
    """A model on an execution provider: placement, EP logits on the evaluation set, EPContext model, latency."""
    import os

    import numpy as np
    import onnxruntime as ort

    from edgekd.runtimes.ort_ep import make_session, placement

    ep = spec["ep"]
    x = np.ascontiguousarray(np.load(spec["input_npy"]), dtype=np.float32)
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    session = make_session(spec["path"], spec["threads"], ep["name"], ep.get("options"),
                           profile_prefix=os.path.join(spec["work_dir"], "ort_profile"),
                           context_path=spec.get("context_out"), legacy_providers=ep.get("legacy_providers", False))
    load_ms = (time.perf_counter() - t0) * 1e3
    name = session.get_inputs()[0].name
    feed = {name: x}
    t0 = time.perf_counter()
    ref = session.run(None, feed)[0]
    first_ms = (time.perf_counter() - t0) * 1e3
    result = {"load_ms": load_ms, "first_ms": first_ms, "batch_size": int(len(x)), "onnxruntime": ort.__version__}
    if spec.get("eval_npy"):
        xe = np.load(spec["eval_npy"])
        t0 = time.perf_counter()
        np.save(spec["eval_out_npy"], _ep_run_batched(session, name, xe, len(x)))
        result["eval"] = {"samples": int(len(xe)), "seconds": time.perf_counter() - t0}
    result["placement"] = placement(session, session.end_profiling(), ep["name"])  # profiling stops here
    for _ in range(spec["warmup"]):
        session.run(None, feed)
    times = np.empty(spec["runs"])
    for i in range(spec["runs"]):
        t = time.perf_counter_ns()
        session.run(None, feed)
        times[i] = (time.perf_counter_ns() - t) / 1e6
    result.update({"runs": int(spec["runs"]), "warmup": int(spec["warmup"]),
                   "latency_ms": {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)),
                                  "p99": float(np.percentile(times, 99)), "mean": float(times.mean()),
                                  "std": float(times.std()), "min": float(times.min())}})
    ctx_path = spec.get("context_out")
    if ctx_path:
        if not os.path.isfile(ctx_path):
            result["context_model"] = {"error": "the execution provider wrote no EPContext model"}
        else:  # the precompiled model must load (without compiling) and give the same outputs
            t0 = time.perf_counter()
            again = make_session(ctx_path, spec["threads"], ep["name"], ep.get("options"))
            ctx_load_ms = (time.perf_counter() - t0) * 1e3
            out = again.run(None, {again.get_inputs()[0].name: x})[0]
            result["context_model"] = {"load_ms": ctx_load_ms, "size_bytes": os.path.getsize(ctx_path),
                                       "max_abs_diff_vs_compiled_session": float(np.abs(out - ref).max())}
            del again
    dists = {}
    for dist in ("onnxruntime-qnn",):
        try:
            dists[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    result.update({"ep_package": dists, "rss_before_load_bytes": rss_before, "peak_rss_bytes": int(_peak_rss_bytes())})
    return result


def measure(spec: dict) -> dict:
    import numpy as np

    if spec.get("ep"):
        return measure_ep(spec)
    x = np.load(spec["input_npy"])
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    if spec["runtime"] == "onnxruntime":
        from edgekd.runtimes.ort_runner import OrtRunner

        runner = OrtRunner(spec["path"], threads=spec["threads"], disabled_optimizers=spec.get("disabled_optimizers"))
    elif spec["runtime"] == "tflite":
        from edgekd.runtimes.tflite_runner import TFLiteRunner

        runner = TFLiteRunner(spec["path"], num_threads=spec["threads"])
    else:
        raise ValueError(f"unknown runtime {spec['runtime']}")
    load_ms = (time.perf_counter() - t0) * 1e3
    feed = runner.prepare(x)
    t0 = time.perf_counter()
    runner.run_raw(feed)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(spec["warmup"]):
        runner.run_raw(feed)
    times = np.empty(spec["runs"])
    clock = time.perf_counter_ns
    for i in range(spec["runs"]):
        t = clock()
        runner.run_raw(feed)
        times[i] = (clock() - t) / 1e6
    peak = _peak_rss_bytes()
    try:
        version = metadata.version(RUNTIME_DISTS[spec["runtime"]])
    except metadata.PackageNotFoundError:
        version = None
    return {"load_ms": load_ms, "first_ms": first_ms, "runs": int(spec["runs"]), "warmup": int(spec["warmup"]),
            "batch_size": int(len(x)),
            "latency_ms": {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)),
                           "p99": float(np.percentile(times, 99)), "mean": float(times.mean()),
                           "std": float(times.std()), "min": float(times.min())},
            "latency_distribution_ms": {"percentiles": DISTRIBUTION_PERCENTILES,
                                        "values": [float(v) for v in np.percentile(times, DISTRIBUTION_PERCENTILES)]},
            "runtime_version": version,
            "rss_before_load_bytes": rss_before, "peak_rss_bytes": int(peak)}


if __name__ == "__main__":
    try:
        result = measure(json.loads(sys.argv[1]))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
    print(json.dumps(result))
