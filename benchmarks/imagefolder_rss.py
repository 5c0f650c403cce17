"""Peak memory of a build on an image folder at a real size: 20,000 RGB 96x96 JPEGs (by default).

The folder is Fashion-MNIST (Debian's dataset-fashion-mnist, idx.gz) rewritten as an image folder: each grey 28x28
training image upscaled to 96x96 (PIL bilinear) and saved as an RGB JPEG (quality 90) under <class name>/. Its
three channels are equal: it has the size, layout and file format of a real RGB folder, not colour content.

Then a small pipeline is built on it up to the distill stage (data -> teacher -> distill; small built-in CNNs,
1 epoch each) in a fresh Python process, one stage after another through edgekd's engine, and the process's peak
RSS is reported after each stage (a 50 ms sampler for the stage's own peak, getrusage's ru_maxrss for the whole
process), next to the sizes of the splits as stored (uint8) and as float32 would have been.

    python benchmarks/imagefolder_rss.py [--out runs/data/fashion-mnist-rgb-96] [--count 20000] [--size 96]
                                         [--format jpeg|png] [--run-dir DIR] [--write-only]

--write-only writes the folder (for pipelines/fashion-mnist-rgb.yaml) and stops. An existing folder written with
the same settings is reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path("/usr/share/datasets/fashion-mnist")
MARKER = ".edgekd-imagefolder.json"  # what wrote the folder (hidden: not a class folder)
sys.path.insert(0, str(REPO))


def write_folder(out: Path, count: int, size: int, fmt: str) -> None:
    """out/<class>/<i>.<jpg|png>: the first `count` Fashion-MNIST training images as RGB size x size files."""
    import numpy as np
    from PIL import Image

    from edgekd.data.datasets import FASHION_CLASSES, read_idx

    settings = {"source": "fashion-mnist train (idx.gz), grey upscaled, written as RGB", "count": count,
                "size": size, "format": fmt}
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == settings:
        print(f"reusing {out} ({count} images)")
        return
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and was not written with these settings; remove it or pass another --out")
    x = read_idx(SOURCE / "train-images-idx3-ubyte.gz")[:count]
    y = read_idx(SOURCE / "train-labels-idx1-ubyte.gz")[:count]
    if len(x) < count:
        sys.exit(f"Fashion-MNIST has {len(x)} training images, fewer than --count {count}")
    t0 = time.perf_counter()
    for name in FASHION_CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    suffix = "jpg" if fmt == "jpeg" else "png"
    for i, (img, label) in enumerate(zip(x, y)):
        rgb = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        path = out / FASHION_CLASSES[int(label)] / f"{i:05d}.{suffix}"
        rgb.save(path, quality=90) if fmt == "jpeg" else rgb.save(path)
    (out / MARKER).write_text(json.dumps(settings))
    files = [p for p in out.rglob(f"*.{suffix}")]
    mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"wrote {len(files)} {fmt.upper()} files ({size}x{size} RGB, {mb:.0f} MB) to {out} in "
          f"{time.perf_counter() - t0:.0f} s; per class: {np.bincount(y, minlength=10).tolist()}")


PIPELINE = {
    "name": "imagefolder-rss", "seed": 0,
    "data": {"dataset": "image-folder", "image_size": [96, 96], "channels": 3, "val_fraction": 0.1,
             "test_fraction": 0.15},
    "teacher": {"arch": "cnn-small", "normalize": {"mean": [0.286] * 3, "std": [0.353] * 3},
                "train": {"epochs": 1, "batch_size": 128}},
    "student": {"arch": "cnn-small", "args": {"channels": [8, 16], "hidden": 32},
                "normalize": {"mean": [0.286] * 3, "std": [0.353] * 3}},
    "distill": {"epochs": 1, "batch_size": 128},
}


def child(pipeline: Path, run_dir: Path) -> None:
    """Build data, teacher, distill one after another in this process; print one JSON line per stage."""
    import resource
    import threading

    import psutil

    from edgekd.config import load_pipeline
    from edgekd.pipeline.engine import Engine
    from edgekd.stages.data import DataStage
    from edgekd.stages.distill import DistillStage
    from edgekd.stages.teacher import TeacherStage
    from edgekd.targets.profiles import load_profile

    proc = psutil.Process()
    peak = {"rss": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    cfg, target = load_pipeline(pipeline), load_profile("x86-64")
    stages = [DataStage(), TeacherStage(), DistillStage()]
    for n in range(1, len(stages) + 1):
        peak["rss"] = proc.memory_info().rss
        t0 = time.perf_counter()
        result = Engine(stages[:n], cfg, target, run_dir, log=lambda m: print(m, file=sys.stderr)).build()
        status = result.records[-1].status
        print(json.dumps({"stage": stages[n - 1].name, "status": status, "seconds": time.perf_counter() - t0,
                          "stage_peak_rss": max(peak["rss"], proc.memory_info().rss),
                          "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
              flush=True)
        if status not in ("ran", "cached"):
            sys.exit(f"stage {stages[n - 1].name}: {status}")
    stop.set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "data" / "fashion-mnist-rgb-96")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--format", choices=("jpeg", "png"), default="jpeg")
    ap.add_argument("--run-dir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("PIPELINE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return 0
    write_folder(args.out.resolve(), args.count, args.size, args.format)
    if args.write_only:
        return 0
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        pipe = Path(tmp) / "imagefolder-rss.yaml"
        spec = json.loads(json.dumps(PIPELINE))
        spec["data"]["path"] = str(args.out.resolve())
        spec["data"]["image_size"] = [args.size, args.size]
        pipe.write_text(yaml.safe_dump(spec))
        log_path = run_dir.parent / "build.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:  # the build log, readable while it runs
            proc = subprocess.run([sys.executable, __file__, "--child", str(pipe), str(run_dir)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=log, text=True)
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0:
            print(f"the build failed (exit {proc.returncode}); stages measured: {rows}; log: {log_path}",
                  file=sys.stderr)
            return 1
        n_img = args.count
        u8 = n_img * 3 * args.size * args.size
        print(f"\nimage folder: {n_img} RGB {args.size}x{args.size} {args.format.upper()} files "
              f"(Fashion-MNIST upscaled, 3 equal channels); splits stored as uint8: {u8 / 2**20:.0f} MiB "
              f"(float32 would be {4 * u8 / 2**20:.0f} MiB)")
        print(f"{'stage':10s} {'status':8s} {'seconds':>8s} {'stage peak RSS':>15s} {'process peak RSS':>17s}")
        for r in rows:
            print(f"{r['stage']:10s} {r['status']:8s} {r['seconds']:8.1f} {r['stage_peak_rss'] / 2**20:11.0f} MiB "
                  f"{r['process_peak_rss'] / 2**20:13.0f} MiB")
        print(f"peak RSS of the build (data -> teacher -> distill, one process): "
              f"{max(r['process_peak_rss'] for r in rows) / 2**20:.0f} MiB")
        for line in log_path.read_text().splitlines():  # the build log's timing lines, for the record
            if "decoded" in line or "headers read" in line or "epoch 1/1" in line:
                print("  log:", line.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
