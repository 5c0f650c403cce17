"""Harness overhead: edgekd's latency figure vs a bare `session.run` loop on the same model, in the same run.

edgekd measures each artifact in a fresh process (edgekd.runtimes.bench_worker, started by the benchmark stage's
run_worker). This script times the same ONNX model both ways, interleaved over several rounds so that drift of the
machine hits both alike, and prints the two medians side by side:

    edgekd      p50 of the worker's timed runs (the figure in report.json), median over rounds
    bare loop   median of `session.run(None, {name: x})` timed with perf_counter_ns in this process

and fails (exit 1) if they differ by more than --tolerance (default 5%).

    python benchmarks/harness_overhead.py [--model M.onnx] [--threads 1] [--runs 300] [--rounds 5]

Without --model it builds a small CNN (3x3 convs at 64x64, about a millisecond on one core) with onnx.helper.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, prev, cin = [], [], "input", 3
    for i, cout in enumerate((16, 32, 32)):
        inits += [numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.1).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, cin = f"r{i}", cout
    inits += [numpy_helper.from_array((rng.standard_normal((10, cin)) * 0.1).astype(np.float32), "wf"),
              numpy_helper.from_array(np.zeros(10, np.float32), "bf")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                          ["batch", 3, 64, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def bare_loop(path: Path, x: np.ndarray, threads: int, warmup: int, runs: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter_ns()
        session.run(None, feed)
        times[i] = (time.perf_counter_ns() - t) / 1e6
    return float(np.median(times))


def main() -> int:
    from edgekd.stages.benchmark import run_worker

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or tmp / "cnn.onnx"
        if args.model is None:
            make_model(model)
        import onnxruntime as ort

        shape = [d if isinstance(d, int) else 1 for d in
                 ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].shape]
        x = np.random.default_rng(1).random(shape, dtype=np.float32)
        np.save(tmp / "input.npy", x)
        spec = {"path": str(model), "runtime": "onnxruntime", "threads": args.threads, "warmup": args.warmup,
                "runs": args.runs, "input_npy": str(tmp / "input.npy")}
        edgekd_p50, bare_p50 = [], []
        for r in range(args.rounds):
            edgekd_p50.append(run_worker(spec)["latency_ms"]["p50"])
            bare_p50.append(bare_loop(model, x, args.threads, args.warmup, args.runs))
            print(f"round {r + 1}: edgekd p50 {edgekd_p50[-1]:.4f} ms   bare session.run median {bare_p50[-1]:.4f} ms")
    e, b = float(np.median(edgekd_p50)), float(np.median(bare_p50))
    diff = (e - b) / b
    print(f"model {model.name if args.model else 'built-in CNN 3x64x64'}, {args.threads} thread(s), "
          f"{args.runs} runs x {args.rounds} rounds")
    print(f"edgekd latency figure (p50, fresh worker process): {e:.4f} ms")
    print(f"bare session.run loop median (this process):        {b:.4f} ms")
    print(f"difference: {100 * diff:+.2f}% (tolerance {100 * args.tolerance:.0f}%): "
          f"{'OK' if abs(diff) <= args.tolerance else 'TOO LARGE'}")
    return 0 if abs(diff) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
