"""Runs inside the emulated aarch64 Python (edgekd/runtimes/aarch64.py): the target's own runtimes on a model.

Run as `python -m edgekd.runtimes.arm_worker SPEC_JSON`; imports only numpy and the runtime under test (the
aarch64 environment has nothing else). Prints one JSON line.

SPEC: {"mode": "evaluate" | "count", "jobs": [{"path", "runtime": "onnxruntime" | "tflite", "out_npy"?}],
       "input_npy", "batch_size" (evaluate), "warmup" and "runs" (count)}
- evaluate: each job's logits for every input row, saved to its out_npy (float32, (N, K)).
- count: each job i runs one prepared input `warmup` times, then `runs` times between two marker system calls
  (start, tag i) and (end, tag i); QEMU's instruction-counting plugin reports what ran between them.
Result: {"jobs": [{"runtime_version", "seconds"}], "machine"}.
"""

from __future__ import annotations

import ctypes
import json
import platform
import sys
import time

MARKER_SYSCALL = 0x4544  # edgekd/runtimes/insn_count.c watches for it


def _runtime_version(runtime: str) -> str:
    # the modules' own __version__: importing importlib.metadata costs seconds under emulation
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    import ai_edge_litert

    return ai_edge_litert.__version__


def _runner(job: dict):
    if job["runtime"] == "onnxruntime":
        from edgekd.runtimes.ort_runner import OrtRunner

        return OrtRunner(job["path"], threads=1)
    from edgekd.runtimes.tflite_runner import TFLiteRunner

    return TFLiteRunner(job["path"], num_threads=1)


def main(spec: dict) -> dict:
    import numpy as np

    x = np.load(spec["input_npy"])
    syscall = ctypes.CDLL(None).syscall
    done = []
    for tag, job in enumerate(spec["jobs"]):
        t0 = time.perf_counter()
        runner = _runner(job)
        if spec["mode"] == "evaluate":
            np.save(job["out_npy"], runner.predict(x, spec.get("batch_size", 256)))
        else:
            feed = runner.prepare(x)
            for _ in range(spec["warmup"]):
                runner.run_raw(feed)
            syscall(MARKER_SYSCALL, 1, tag)
            for _ in range(spec["runs"]):
                runner.run_raw(feed)
            syscall(MARKER_SYSCALL, 2, tag)
        done.append({"runtime_version": _runtime_version(job["runtime"]),
                     "seconds": time.perf_counter() - t0})
        del runner
    return {"jobs": done, "machine": platform.machine()}


if __name__ == "__main__":
    try:
        result = main(json.loads(sys.argv[1]))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
    print(json.dumps(result))
