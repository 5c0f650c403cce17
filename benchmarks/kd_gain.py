"""Does distillation help? Hinton et al.'s classic result, reproduced on real data with edgekd's own trainer.

Fashion-MNIST, the first 10,000 training images (after the fixed shuffle), the full 10,000-image test set.
A CNN teacher (`cnn-teacher`) is trained once; then for each seed a student MLP 800-800 (`mlp`) is trained twice
from the SAME initial weights and the SAME batch order: once from scratch (label cross-entropy only), once by
logit KD from the teacher (alpha * T^2 KL + (1 - alpha) CE, teacher output cache on). Prints the mean test
accuracy of each over the seeds with its standard deviation, and the paired per-seed gains.

    python benchmarks/kd_gain.py                     # 3 seeds, T=4, alpha=0.9 (several minutes on 2 cores)
    python benchmarks/kd_gain.py --seeds 5 --epochs 30
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgekd.config import DataConfig, TrainConfig
from edgekd.data.datasets import load_splits
from edgekd.distill.trainer import KDSettings, accuracy, predict_logits, train
from edgekd.models.zoo import build_model, count_params

MEAN, STD = 0.286, 0.353  # Fashion-MNIST pixel statistics (as in pipelines/fashion-mnist.yaml)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-limit", type=int, default=10_000)
    ap.add_argument("--teacher-epochs", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=20, help="student epochs (both arms)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    args = ap.parse_args()

    splits = load_splits(DataConfig(dataset="fashion-mnist", train_limit=args.train_limit), seed=0)
    shape, k = splits.input_shape, splits.num_classes
    print(f"Fashion-MNIST: train {len(splits.y_train)}, val {len(splits.y_val)}, test {len(splits.y_test)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    quiet = lambda msg: None  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        teacher = build_model("cnn-teacher", {}, shape, k, MEAN, STD)
        train(teacher, TrainConfig(epochs=args.teacher_epochs, batch_size=128, lr=1e-3), splits.x_train,
              splits.y_train, splits.x_val, splits.y_val, seed=0, work_dir=_fresh(tmp / "teacher"), log=quiet,
              stage="teacher")
        teacher_test = accuracy(predict_logits(teacher, splits.x_test), splits.y_test)
        cached = predict_logits(teacher, splits.x_train)  # the teacher output cache
        print(f"teacher cnn-teacher ({count_params(teacher):,} params): test accuracy {100 * teacher_test:.2f}% "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)

        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
        scratch, kd = [], []
        for seed in range(args.seeds):
            torch.manual_seed(1000 + seed)
            init = build_model("mlp", {"hidden": [800, 800]}, shape, k, MEAN, STD)  # paired initialization
            accs = {}
            for arm in ("scratch", "kd"):
                student = copy.deepcopy(init)
                settings = KDSettings(args.alpha, args.temperature) if arm == "kd" else None
                t1 = time.perf_counter()
                train(student, cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val, seed=seed,
                      work_dir=_fresh(tmp / f"{arm}{seed}"), kd=settings,
                      teacher_logits=cached if arm == "kd" else None, log=quiet, stage=arm)
                accs[arm] = accuracy(predict_logits(student, splits.x_test), splits.y_test)
                print(f"  seed {seed} {arm:7s}: test accuracy {100 * accs[arm]:.2f}% "
                      f"[{time.perf_counter() - t1:.0f} s]", flush=True)
            scratch.append(accs["scratch"])
            kd.append(accs["kd"])

    gains = [b - a for a, b in zip(scratch, kd)]
    print()
    print(f"student mlp 800-800 ({count_params(init):,} params), {args.epochs} epochs, {args.seeds} seeds, "
          f"paired initializations; KD T={args.temperature}, alpha={args.alpha}")
    print(f"  from scratch:       {_mean_sd(scratch)}")
    print(f"  distilled (KD):     {_mean_sd(kd)}")
    print(f"  paired gain KD-CE:  {_mean_sd(gains, signed=True)} points; KD better in "
          f"{sum(g > 0 for g in gains)}/{len(gains)} seeds")
    print(f"  teacher:            {100 * teacher_test:.2f}%")
    return 0 if statistics.mean(kd) > statistics.mean(scratch) else 1


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _mean_sd(values: list[float], signed: bool = False) -> str:
    m = 100 * statistics.mean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:+.2f} ± {sd:.2f}" if signed else f"{m:.2f}% ± {sd:.2f} (sd over seeds)"


if __name__ == "__main__":
    sys.exit(main())
