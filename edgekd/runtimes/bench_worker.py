"""Measure one model in this (fresh) process and print one JSON line.

Run as `python -m edgekd.runtimes.bench_worker SPEC_JSON`. Only the runtime under test is imported (no torch,
no TensorFlow), so the peak RSS is that of a process serving this model with this runtime.

SPEC: {"path", "runtime": "onnxruntime"|"tflite", "threads", "warmup", "runs", "input_npy"}
Result: load_ms, first_ms, latency_ms {p50, p90, p99, mean, std, min}, runs, rss_before_load_bytes, peak_rss_bytes.
"""

from __future__ import annotations

import json
import resource
import sys
import time


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


def measure(spec: dict) -> dict:
    import numpy as np

    x = np.load(spec["input_npy"])
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    if spec["runtime"] == "onnxruntime":
        from edgekd.runtimes.ort_runner import OrtRunner

        runner = OrtRunner(spec["path"], threads=spec["threads"])
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
    return {"load_ms": load_ms, "first_ms": first_ms, "runs": int(spec["runs"]), "warmup": int(spec["warmup"]),
            "batch_size": int(len(x)),
            "latency_ms": {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)),
                           "p99": float(np.percentile(times, 99)), "mean": float(times.mean()),
                           "std": float(times.std()), "min": float(times.min())},
            "rss_before_load_bytes": rss_before, "peak_rss_bytes": int(peak)}


if __name__ == "__main__":
    try:
        result = measure(json.loads(sys.argv[1]))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
    print(json.dumps(result))
