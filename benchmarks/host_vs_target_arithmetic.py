"""One built run, three arithmetics: why an ARM target's accuracy must come from ARM kernels.

For every artifact of a finished build (default: runs/fashion-mnist-android-arm64) this prints, side by side, the
test accuracy computed by
  - this host's own kernels (native x86, whatever its CPU has: VNNI or not),
  - an x86 CPU without VNNI (AVX2 + FMA only: QEMU's `Haswell-noTSX-IBRS` model running edgekd's own x86 Python and
    onnxruntime under qemu-x86_64): what a build host without VNNI computes,
  - the target: the aarch64 runtimes on each emulated ARM CPU the profile names (edgekd/runtimes/aarch64.py),
and the number of test images on which each disagrees with the target's top-1. It needs Debian's qemu-user.

    python benchmarks/host_vs_target_arithmetic.py [RUN_DIR] [--samples N] [--cpus cortex-a76,cortex-a53]

Emulation is slow (about 20-30x host time for int8 models, 100-250x for fp32 ones): --samples caps the test images
(a fixed seeded subset) and --only picks artifacts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgekd.data.datasets import Splits  # noqa: E402
from edgekd.runtimes import aarch64  # noqa: E402

NO_VNNI_CPU = "Haswell-noTSX-IBRS"  # AVX2 + FMA, no AVX-512, no VNNI


def x86_logits(path: str, runtime: str, x: np.ndarray, qemu_cpu: str | None) -> np.ndarray:
    """Logits from edgekd's own x86 runtimes, natively (qemu_cpu None) or on an emulated x86 CPU model."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", x)
        code = ("import sys, numpy as np\n"
                "sys.path.insert(0, sys.argv[4])\n"
                "x = np.load(sys.argv[1])\n"
                "if sys.argv[3] == 'onnxruntime':\n"
                "    from edgekd.runtimes.ort_runner import OrtRunner as R; r = R(sys.argv[2], threads=1)\n"
                "else:\n"
                "    from edgekd.runtimes.tflite_runner import TFLiteRunner as R; r = R(sys.argv[2], num_threads=1)\n"
                "np.save(sys.argv[1] + '.out.npy', r.predict(x))\n")
        cmd = (["qemu-x86_64", "-cpu", qemu_cpu] if qemu_cpu else []) + [
            sys.executable, "-c", code, str(Path(tmp) / "x.npy"), path, runtime, str(REPO)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{Path(path).name} on {qemu_cpu or 'host'}: {proc.stderr.strip().splitlines()[-1:]}")
        return np.load(Path(tmp) / "x.npy.out.npy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", default=str(REPO / "runs" / "fashion-mnist-android-arm64"))
    ap.add_argument("--samples", type=int, default=None, help="cap on test images (fixed seeded subset)")
    ap.add_argument("--cpus", default=None, help="ARM CPUs to emulate (default: the build's profile's)")
    ap.add_argument("--only", default=None, help="comma-separated artifact names")
    args = ap.parse_args()
    run = Path(args.run_dir)
    report = json.loads((run / "report.json").read_text())
    splits = Splits.load(run / "stages" / "data" / "splits.npz")
    x, y = splits.x_test, splits.y_test
    if args.samples and args.samples < len(y):
        idx = np.sort(np.random.default_rng(0).choice(len(y), size=args.samples, replace=False))
        x, y = x[idx], y[idx]
    x = np.ascontiguousarray(x, dtype=np.float32)
    cpus = args.cpus.split(",") if args.cpus else report["target_profile"]["emulate_cpus"]
    only = set(args.only.split(",")) if args.only else None
    arts = [(a["name"], str(run / a["path"]), a["runtime"]) for a in report["artifacts"]
            if only is None or a["name"] in only]
    env = aarch64.ensure_env()
    print(f"{run}: {len(y)} test images; host {report['host']['cpu']} ({' '.join(report['host']['cpu_flags'])})")
    cols = ["host (native)", f"x86 no VNNI ({NO_VNNI_CPU}, qemu)"] + [f"aarch64 {c} (qemu)" for c in cpus]
    print("| artifact | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, path, runtime in arts:
        t0 = time.perf_counter()
        target = {c: aarch64.predict(env, c, [(path, runtime)], x)[path]["logits"].argmax(1) for c in cpus}
        ref = target[cpus[0]]
        cells = []
        for top1 in (x86_logits(path, runtime, x, None).argmax(1), x86_logits(path, runtime, x, NO_VNNI_CPU).argmax(1),
                     *target.values()):
            differs = int((top1 != ref).sum())
            cells.append(f"{(top1 == y).mean():.4f}" + (f" ({differs} differ)" if differs else ""))
        print(f"| `{name}` | " + " | ".join(cells) + f" |   <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
