"""Data-parallel distillation throughput: samples per second with 1 and 2 processes, measured side by side.

edgekd's own trainer (the one the distill, prune-recovery and QAT stages use) distils the default student
(cnn-small) from the default teacher (cnn-teacher) on 10,000 Fashion-MNIST images, in two arms:
  teacher-per-batch  the teacher runs on every batch on every rank (what feature-level KD needs)
  teacher-cache      the teacher's logits computed once beforehand (the default pipeline's cache)
For each arm and each process count N, N fresh processes join a gloo group (torch.distributed, CPU) exactly as
`edgekd build --nproc N` ranks do (for N = 1: one plain process), train `--epochs` epochs with the global batch split
among the ranks, and report the epochs' wall time on rank 0 (the validation pass included, as in a build). Rounds
are interleaved (1, N, 1, N, ...) so load on the machine hits both alike; the median round is printed.

    python benchmarks/ddp_scaling.py                       # 1 vs 2 processes, 3 rounds
    python benchmarks/ddp_scaling.py --nproc 1 2 4 --rounds 5

What limits it here: the host has 2 cores. One process already uses both (2 intra-op threads); 2 processes get one
thread each, so data parallelism mostly replaces intra-op parallelism rather than adding compute, and every step
adds a gradient all-reduce through gloo (the student's ~106k parameters) plus a per-step finite-loss check. A gain
comes from what threads do badly on small tensors (per-op synchronisation) and from the halved per-rank batch.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ARMS = ("teacher-per-batch", "teacher-cache")


def _rank(rank: int, nproc: int, port: int, args: dict, out: str) -> None:
    """One rank: build the same student/teacher, train, rank 0 writes its wall time."""
    if nproc > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from edgekd import distributed
    from edgekd.config import DataConfig, TrainConfig
    from edgekd.data.datasets import load_splits
    from edgekd.distill.trainer import KDSettings, predict_logits, train
    from edgekd.models.zoo import build_model

    w = distributed.init_from_env()
    splits = load_splits(DataConfig(dataset="fashion-mnist", train_limit=args["train_limit"]), seed=0)
    x_val, y_val = splits.x_val[:1000], splits.y_val[:1000]
    torch.manual_seed(0)
    teacher = build_model("cnn-teacher", {}, splits.input_shape, splits.num_classes).eval()
    student = build_model("cnn-small", {}, splits.input_shape, splits.num_classes)
    cached = predict_logits(teacher, splits.x_train) if args["arm"] == "teacher-cache" else None
    cfg = TrainConfig(epochs=args["epochs"], batch_size=args["batch_size"], lr=3e-3)
    with tempfile.TemporaryDirectory() as tmp:
        w.barrier()
        t0 = time.perf_counter()
        train(student, cfg, splits.x_train, splits.y_train, x_val, y_val, seed=0, work_dir=Path(tmp),
              kd=KDSettings(alpha=0.7, temperature=4.0), teacher_logits=cached,
              teacher=teacher if cached is None else None, log=lambda m: None, stage="bench")
        seconds = time.perf_counter() - t0
    if w.is_main:
        Path(out).write_text(f"{seconds} {torch.get_num_threads()}")
    distributed.leave_together(w)  # ranks other than 0 exit here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(nproc: int, arm: str, args: argparse.Namespace) -> tuple[float, int]:
    """(seconds for the epochs on rank 0, intra-op threads per rank) in fresh processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "seconds")
        spec = {"arm": arm, "epochs": args.epochs, "batch_size": args.batch_size, "train_limit": args.train_limit}
        mp.spawn(_rank, args=(nproc, _free_port(), spec, out), nprocs=nproc, join=True)
        seconds, threads = Path(out).read_text().split()
        return float(seconds), int(threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-limit", type=int, default=10_000)
    args = ap.parse_args()

    samples = args.epochs * args.train_limit
    print(f"host: {os.cpu_count()} cores, torch {torch.__version__}, CPU, gloo; student cnn-small from teacher "
          f"cnn-teacher, {args.train_limit} Fashion-MNIST training images x {args.epochs} epochs, global batch "
          f"{args.batch_size}; {args.rounds} interleaved rounds", flush=True)
    results: dict[tuple[str, int], list[float]] = {}
    threads: dict[int, int] = {}
    for r in range(args.rounds):
        for arm in ARMS:
            for n in args.nproc:
                seconds, threads[n] = measure(n, arm, args)
                results.setdefault((arm, n), []).append(seconds)
                print(f"  round {r + 1} {arm:18s} {n} process(es): {seconds:6.2f} s = {samples / seconds:7.0f} "
                      f"samples/s", flush=True)
    print()
    print(f"{'arm':18s} {'processes':>9s} {'threads/rank':>12s} {'median s':>9s} {'samples/s':>10s} {'speed-up':>9s}")
    for arm in ARMS:
        base = statistics.median(results[(arm, args.nproc[0])])
        for n in args.nproc:
            med = statistics.median(results[(arm, n)])
            print(f"{arm:18s} {n:>9d} {threads[n]:>12d} {med:>9.2f} {samples / med:>10.0f} {base / med:>8.2f}x")
    print("\nmeasured on this x86 host's CPU (no GPU); the speed-up is relative to the first process count")
    return 0


if __name__ == "__main__":
    sys.exit(main())
