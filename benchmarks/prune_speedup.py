"""What structured pruning buys: the unpruned and the pruned student side by side, measured in the same run.

Reads a finished build of a pipeline with `prune:` on (default: pipelines/fashion-mnist-pruned.yaml in
runs/fashion-mnist-pruned-android-arm64): the distilled (unpruned) student from the distill stage, the pruned and
recovered one from the prune stage. Both are exported to fp32 ONNX here the same way (edgekd's exporter), then
timed with edgekd's benchmark worker (a fresh process per measurement, onnxruntime CPU), interleaved over several
rounds so drift of the machine hits both alike. Prints params, MACs, test accuracy (onnxruntime) and the median p50
latency of each, and the pruned / unpruned ratios.

Two onnxruntime graphs are timed, both on this host:
  target graph   what the pipeline's benchmark stage runs for --target (default android-arm64): ORT_ENABLE_ALL minus
                 the optimizers the target's onnxruntime lacks (for ARM: the NCHWc layout transformer; see
                 TargetProfile.host_disabled_optimizers). --check uses this one.
  x86 graph      ORT_ENABLE_ALL as this x86 host runs it natively. NCHWc blocks channels by 16 (AVX-512) or 8
                 (AVX2): a conv pruned from 16 to 8 outputs still computes 16, and layers whose channels are not a
                 block multiple get ReorderOutput nodes and fall back to NCHW pooling. Printed for the record.

    python benchmarks/prune_speedup.py [--pipeline P.yaml] [--run-dir DIR] [--target android-arm64] [--batch 1]
                                       [--threads 1] [--runs 500] [--rounds 5] [--check]

Exit 1 with --check when the pruned student misses the issue's bar on the target graph (params <= 30%, p50 <= 60%,
accuracy within 1 point of the unpruned student).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", type=Path, default=REPO / "pipelines" / "fashion-mnist-pruned.yaml")
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="images per inference call (the pipeline benchmarks 1)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="exit 1 unless the pruned student meets the bar")
    ap.add_argument("--target", default="android-arm64", help="target profile whose onnxruntime graph --check uses")
    args = ap.parse_args()

    from edgekd.compress.pruning import count_macs_params, load_pruned
    from edgekd.config import load_pipeline
    from edgekd.data.datasets import Splits
    from edgekd.distill.trainer import accuracy
    from edgekd.export.onnx_export import export_onnx
    from edgekd.models.zoo import model_from_config
    from edgekd.runtimes.ort_runner import OrtRunner
    from edgekd.stages.benchmark import run_worker
    from edgekd.targets.profiles import cpu_model, load_profile

    cfg = load_pipeline(args.pipeline)
    profile = load_profile(args.target)
    graphs = {"target": profile.host_disabled_optimizers, "x86": []}  # name -> onnxruntime optimizers turned off
    run_dir = args.run_dir or REPO / "runs" / f"{cfg.name}-{profile.name}"
    stages = run_dir / "stages"
    if not (stages / "prune" / "student_shapes.json").is_file():
        print(f"no prune stage output in {run_dir}: build {args.pipeline} first (with prune enabled)", file=sys.stderr)
        return 2
    splits = Splits.load(stages / "data" / "splits.npz")

    def fresh():
        return model_from_config(cfg.student, splits.input_shape, splits.num_classes)

    unpruned = fresh()
    unpruned.load_state_dict(torch.load(stages / "distill" / "student.pt", weights_only=True))
    pruned = load_pruned(fresh(), json.loads((stages / "prune" / "student_shapes.json").read_text()),
                         stages / "prune" / "student.pt")
    example = torch.from_numpy(splits.x_val[:2])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        x1 = Path(tmp) / "input.npy"
        np.save(x1, splits.x_test[:args.batch])
        for name, model in (("unpruned", unpruned.eval()), ("pruned", pruned)):
            path = Path(tmp) / f"{name}_fp32.onnx"
            export_onnx(model, splits.x_val[:64], path, opset=cfg.export.opset)
            macs, params = count_macs_params(model, example)
            acc = accuracy(OrtRunner(path, threads=2).predict(splits.x_test), splits.y_test)
            rows[name] = {"path": path, "params": params, "macs": macs, "accuracy": acc,
                          "p50": {graph: [] for graph in graphs}}
        for _ in range(args.rounds):  # interleaved: unpruned, pruned, unpruned, pruned... for each graph
            for graph, disabled in graphs.items():
                for name, row in rows.items():
                    spec = {"path": str(row["path"]), "runtime": "onnxruntime", "threads": args.threads,
                            "warmup": args.warmup, "runs": args.runs, "input_npy": str(x1),
                            "disabled_optimizers": disabled}
                    row["p50"][graph].append(run_worker(spec)["latency_ms"]["p50"])
    median = {(name, graph): statistics.median(row["p50"][graph]) for name, row in rows.items() for graph in graphs}

    u, p = rows["unpruned"], rows["pruned"]
    ratios = {"params": p["params"] / u["params"], "macs": p["macs"] / u["macs"],
              **{graph: median["pruned", graph] / median["unpruned", graph] for graph in graphs}}
    drop = (u["accuracy"] - p["accuracy"]) * 100
    print(f"pipeline {cfg.name} ({args.pipeline}); run dir {run_dir}")
    print(f"fp32 ONNX, onnxruntime CPU on this host ({platform.machine()}, {cpu_model()}), batch "
          f"{args.batch}, {args.threads} thread(s), {args.runs} timed runs x {args.rounds} interleaved rounds")
    labels = {"target": f"{profile.name} graph (without {', '.join(graphs['target']) or 'nothing'})",
              "x86": "x86 graph (ORT_ENABLE_ALL, NCHWc)"}
    print(f"{'':10s} {'params':>10s} {'MACs':>12s} {'test acc':>9s}")
    for name, row in rows.items():
        print(f"{name:10s} {row['params']:>10,d} {row['macs']:>12,d} {row['accuracy']:>9.4f}")
    for graph in graphs:
        print(f"p50 ms, {labels[graph]}: median of rounds, then the rounds")
        for name, row in rows.items():
            print(f"  {name:10s} {median[name, graph]:.4f}   " + " ".join(f"{v:.4f}" for v in row["p50"][graph]))
    print(f"pruned / unpruned: params {ratios['params']:.1%}, MACs {ratios['macs']:.1%}, p50 {ratios['target']:.1%} "
          f"on the {profile.name} graph ({ratios['x86']:.1%} on the x86 graph); accuracy {-drop:+.2f} points")
    ok = ratios["params"] <= 0.30 and ratios["target"] <= 0.60 and drop <= 1.0
    print(f"bar (params <= 30%, p50 <= 60% on the {profile.name} graph, accuracy within 1 point): "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
