"""The architecture matrix: real torchvision / timm students through edgekd's pipeline, both TFLite routes side by side.

For each architecture the real CLI builds a small pipeline (`edgekd build`, one process per build): Fashion-MNIST
as RGB at SIZE x SIZE (the first 512 training (--train-images) and 256 test images, grey repeated to 3 channels,
upscaled: with --epochs 1 a test of the path, not of accuracy), a small built-in CNN teacher, the architecture as
the student (logit KD; --epochs for both, default 1: real BatchNorm statistics but near-chance accuracy, so int8
agreement needs more epochs and images to mean something), ONNX fp32 + int8 QDQ, then TFLite fp32 + int8 once per
route (`tflite.converter: litert-torch`, then `onnx2tf`, in one run dir: the second build reuses every stage before
the TFLite ones from the stage store), evaluate on the host, benchmark at 1 thread (a profile copied from x86-64 with
threads: 1; host latency, not a device's).

One row per (architecture, artifact, route): outcome (ok, or the stage's one-line failure naming converter and op),
parity (fp32: max |TFLite - ONNX| relative to the ONNX logit range; int8: top-1 agreement with the ONNX fp32 model
on validation images), loads in LiteRT + XNNPACK (checked in a fresh process by the stage), file size, host p50 at
1 thread, conversion seconds, and the op summary (float ops in an int8 file, QUANTIZE/DEQUANTIZE, TRANSPOSE).

    python benchmarks/arch_matrix.py [--out runs/arch-matrix] [--size 96] [--only resnet18,timm:ghostnet_050]
                                     [--routes litert-torch,onnx2tf] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (student arch, constructor args): the 14 architectures of the "any model" issue
ARCHS: list[tuple[str, dict]] = [
    ("torchvision:mobilenet_v2", {}),
    ("torchvision:mobilenet_v3_small", {}),
    ("torchvision:resnet18", {}),
    ("torchvision:efficientnet_b0", {}),
    ("torchvision:shufflenet_v2_x0_5", {}),
    ("torchvision:squeezenet1_1", {}),
    ("torchvision:regnet_x_400mf", {}),
    ("torchvision:mnasnet0_5", {}),
    ("torchvision:convnext_tiny", {}),
    ("timm:mobilenetv3_small_050", {}),
    ("timm:efficientnet_lite0", {}),
    ("timm:ghostnet_050", {}),
    ("timm:mobilevit_xxs", {}),
    ("timm:vit_tiny_patch16_224", {"img_size": "SIZE"}),
]
ROUTES = ("litert-torch", "onnx2tf")
TFLITE = ("student_fp32.tflite", "student_int8.tflite")


def write_data(path: Path, train: int = 512, test: int = 256) -> Path:
    """Fashion-MNIST's first `train` training and `test` test images (28x28 grey) as an npz edgekd reads."""
    import numpy as np

    from edgekd.data.datasets import DEFAULT_PATHS, read_idx

    if path.is_file():
        return path
    src = Path(DEFAULT_PATHS["fashion-mnist"])
    x_tr = read_idx(src / "train-images-idx3-ubyte.gz")[:train, None]
    y_tr = read_idx(src / "train-labels-idx1-ubyte.gz")[:train].astype(np.int64)
    x_te = read_idx(src / "t10k-images-idx3-ubyte.gz")[:test, None]
    y_te = read_idx(src / "t10k-labels-idx1-ubyte.gz")[:test].astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return path


def write_profile(path: Path) -> Path:
    import yaml

    profile = yaml.safe_load((REPO / "devices" / "x86-64.yaml").read_text())
    profile.update(name="x86-64-1thread", description="this x86-64 build host at 1 thread (arch matrix)",
                   threads=1)
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


def pipeline(arch: str, args: dict, data: Path, size: int, route: str, epochs: int = 1, samples: int = 64,
             min_agreement: float = 0.0) -> dict:
    args = {k: (size if v == "SIZE" else v) for k, v in args.items()}
    return {
        "name": "arch-" + arch.replace(":", "-").replace("_", "-"),
        "seed": 0,
        "data": {"dataset": "npz", "path": str(data), "channels": 3, "image_size": [size, size],
                 "val_fraction": 0.15, "test_fraction": 0.2},
        "teacher": {"arch": "cnn", "args": {"channels": [8, 16, 32], "hidden": 64},
                    "normalize": {"mean": [0.286] * 3, "std": [0.353] * 3},
                    "train": {"epochs": epochs, "batch_size": 32, "lr": 0.002}},
        "student": {"arch": arch, "args": args, "normalize": {"mean": [0.286] * 3, "std": [0.353] * 3}},
        "distill": {"epochs": epochs, "batch_size": 32, "lr": 0.002, "alpha": 0.7, "temperature": 4.0},
        # the path test (min_agreement 0) gates neither int8 file: at 1 epoch a near-chance student's logits are near
        # ties, so agreement says nothing (a student that predicts one class "agrees" on 1.000); trained runs keep
        # the ONNX default
        "quantize": {"calibration_samples": samples, **({"min_fp32_agreement": 0.0} if min_agreement == 0 else {})},
        "tflite": {"converter": route, "calibration_samples": samples, "parity_samples": samples,
                   # 1 epoch leaves most logits close together: agreement is measured and printed, not gated here
                   "int8_min_agreement": min_agreement},
        "evaluate": {"emulate": False},
        "benchmark": {"warmup": 5, "runs": 30, "batch_size": 1, "arm_instructions": False,
                      "include_teacher": False},
        "budget": {"max_accuracy_drop": 1.0},
    }


def build(run_dir: Path, pipe: dict, profile: Path, timeout: int) -> tuple[dict | None, float, str]:
    """One `edgekd build`; (report or None, seconds, last stderr line)."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    pfile = run_dir / f"pipeline-{pipe['tflite']['converter']}.yaml"
    pfile.write_text(yaml.safe_dump(pipe, sort_keys=False))
    t0 = time.perf_counter()
    cmd = [str(Path(sys.executable).parent / "edgekd"), "build", "--pipeline", str(pfile), "--target", str(profile),
           "--run-dir", str(run_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        err = (proc.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        err = f"build timed out after {timeout} s"
    (run_dir / f"build-{pipe['tflite']['converter']}.log").write_text(
        (proc.stdout + "\n" + proc.stderr) if "proc" in locals() else err)
    report = None
    if (run_dir / "report.json").is_file():
        report = json.loads((run_dir / "report.json").read_text())
        shutil.copyfile(run_dir / "report.json", run_dir / f"report-{pipe['tflite']['converter']}.json")
    return report, time.perf_counter() - t0, err


def rows_of(arch: str, route: str, report: dict | None, err: str) -> list[dict]:
    """Matrix rows of one build: the TFLite artifacts of this route (and, for the first route, the ONNX ones)."""
    if report is None:
        return [{"arch": arch, "route": route, "artifact": a, "outcome": f"no report: {err}"} for a in TFLITE]
    arts = {a["name"]: a for a in report["artifacts"]}
    stages = {s["name"]: s for s in report.get("stages", [])}
    rows = []
    names = list(TFLITE) + (["student_fp32.onnx", "student_int8.onnx"] if route == ROUTES[0] else [])
    for name in names:
        a = arts.get(name)
        row = {"arch": arch, "route": route if name.endswith(".tflite") else "torch.onnx", "artifact": name}
        if a is None:
            stage = {"student_fp32.tflite": "export_tflite", "student_int8.tflite": "quantize_tflite",
                     "student_fp32.onnx": "export_onnx", "student_int8.onnx": "quantize"}[name]
            s = stages.get(stage, {})
            row["outcome"] = f"FAILED ({stage}): {s.get('message') or s.get('status') or 'not run'}"
            rows.append(row)
            continue
        conv = a.get("converter") or {}
        ops = conv.get("ops") or {}
        row.update(outcome="ok", size_kib=round(a["size_bytes"] / 1024, 1),
                   p50_ms=(a.get("latency_ms") or {}).get("p50"), accuracy=a.get("accuracy"),
                   seconds=conv.get("seconds"), static_batch=conv.get("static_batch"),
                   activations=conv.get("activations"),
                   float_ops=ops.get("float_ops"), quantize_ops=ops.get("quantize"),
                   dequantize_ops=ops.get("dequantize"), transposes=ops.get("transpose"), total_ops=ops.get("total"))
        rows.append(row)
    return rows


def stage_data(run_dir: Path, stage: str) -> dict:
    """A stage's summary as the engine stored it (parity figures come from the stages' own checks)."""
    f = run_dir / "stages" / stage / "manifest.json"
    if not f.is_file():
        return {}
    return json.loads(f.read_text()).get("data", {})


def run_arch(arch: str, args: dict, out: Path, size: int, routes=ROUTES, timeout: int = 3600,
             epochs: int = 1, train_images: int = 512, samples: int = 64, min_agreement: float = 0.0) -> list[dict]:
    data = write_data(out / f"fashion-mnist-{train_images}.npz", train=train_images)
    profile = write_profile(out / "x86-64-1thread.yaml")
    run_dir = out / arch.replace(":", "-")
    rows = []
    for route in routes:
        pipe = pipeline(arch, args, data, size, route, epochs, samples, min_agreement)
        report, seconds, err = build(run_dir, pipe, profile, timeout)
        got = rows_of(arch, route, report, err)
        fp32, int8 = stage_data(run_dir, "export_tflite"), stage_data(run_dir, "quantize_tflite")
        onnx, q = stage_data(run_dir, "export_onnx"), stage_data(run_dir, "quantize")
        distill = stage_data(run_dir, "distill")
        for row in got:
            if row["outcome"] != "ok":
                continue
            if row["artifact"] == "student_fp32.tflite":
                row["parity"] = f"{fp32['fp32_parity']['max_abs_diff_rel_logit_range']:.1e} of range"
            elif row["artifact"] == "student_int8.tflite":
                row["parity"] = f"top-1 {int8['int8_parity']['top1_agreement']:.3f}"
            elif row["artifact"] == "student_fp32.onnx":
                p = onnx.get("student", {}).get("parity", {})
                row["parity"] = f"max |diff| {p.get('max_abs_diff', float('nan')):.1e}"
            elif row["artifact"] == "student_int8.onnx":
                agree = q.get("fp32_agreement")
                row["parity"] = f"top-1 {agree:.3f}" if isinstance(agree, float) else None
        for row in got:
            row.update(student_val_accuracy=distill.get("val_accuracy"),
                       batchnorm_recalibration=distill.get("batchnorm_recalibration"))
            row.update(build_seconds=round(seconds, 1), epochs=epochs, train_images=train_images,
                       calibration_and_parity_samples=samples, int8_min_agreement=min_agreement)
        rows += got
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| architecture | artifact | route | outcome | parity vs ONNX | size KiB | host p50 ms (1 thread) | "
            "convert s | float ops | Q/DQ | transposes |")
    lines = [head, "|---|---|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        ok = r["outcome"] == "ok"
        lines.append("| " + " | ".join(str(v) for v in (
            r["arch"], r["artifact"], r["route"],
            ("ok" + (" (dynamic activations)" if r.get("activations") == "dynamic" else "")) if ok
            else r["outcome"][:220].replace("|", "/"),
            r.get("parity") or "", r.get("size_kib", ""), f"{r['p50_ms']:.2f}" if r.get("p50_ms") else "",
            f"{r['seconds']:.0f}" if r.get("seconds") else "",
            r.get("float_ops", "") if r.get("float_ops") is not None else "",
            f"{r.get('quantize_ops', 0)}/{r.get('dequantize_ops', 0)}" if ok and r["artifact"].endswith(".tflite") else "",
            r.get("transposes", "") if r.get("transposes") is not None else "")) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "arch-matrix"))
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--only", default="", help="comma-separated archs (as in ARCHS) to run")
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--markdown", default="", help="also write the table to this file")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per build")
    ap.add_argument("--epochs", type=int, default=1, help="teacher and student epochs (1: a test of the path)")
    ap.add_argument("--train-images", type=int, default=512,
                    help="Fashion-MNIST training images (more, with --epochs, for int8 agreement on trained weights)")
    ap.add_argument("--samples", type=int, default=64,
                    help="calibration and parity images (pipelines default to 256; 64 keeps the path test quick)")
    ap.add_argument("--int8-min-agreement", type=float, default=0.0,
                    help="tflite.int8_min_agreement (0: every int8 file ships, ONNX too, the path test; pipelines default to "
                         "0.95, below which auto falls back to dynamic activations)")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    archs = [(n, args) for n, args in ARCHS if not only or n in only or n.split(":")[1] in only]
    routes = tuple(r for r in a.routes.split(",") if r)
    print(f"arch matrix: {len(archs)} architectures x {routes} at 3x{a.size}x{a.size}; host "
          f"{os.cpu_count()} cores; latency = this host at 1 thread, not a device", flush=True)
    all_rows = []
    results = out / "rows.jsonl"
    for arch, args in archs:
        t0 = time.perf_counter()
        rows = run_arch(arch, args, out, a.size, routes, a.timeout, a.epochs, a.train_images,
                        a.samples, a.int8_min_agreement)
        all_rows += rows
        with results.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"\n## {arch} ({time.perf_counter() - t0:.0f} s)\n" + markdown(rows), flush=True)
    table = markdown(all_rows)
    print("\n# matrix\n" + table)
    if a.markdown:
        Path(a.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
