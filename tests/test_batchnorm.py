"""BatchNorm statistics re-estimated after training (edgekd.distill.batchnorm): what they are, when they are kept.

The failure they fix is real: torchvision's MNASNet (BatchNorm momentum 0.0003) predicted one class in eval mode after
5 epochs of distillation in the architecture matrix. Here the same momentum on a small CNN and sklearn digits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.config import TrainConfig
from edgekd.distill import batchnorm
from edgekd.distill.trainer import _recalibrate_batchnorm, accuracy, predict_logits, train
from edgekd.distributed import world


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    return x[:1200], y[:1200], x[1200:1500], y[1200:1500], x[1500:], y[1500:]


def _slow_momentum_cnn() -> nn.Module:
    """BatchNorm with MNASNet's momentum: its running statistics barely move in a short run."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=0.0003), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32, momentum=0.0003), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 10))


def _fit(policy: str, work_dir: Path, log=lambda m: None):
    x, y, xv, yv, xs, ys = _digits()
    model = _slow_momentum_cnn()
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.01, recalibrate_batchnorm=policy)
    result = train(model, cfg, x, y, xv, yv, seed=0, work_dir=work_dir, log=log)
    return model, result, accuracy(predict_logits(model, xs), ys)


def test_stale_statistics_are_re_estimated_and_eval_mode_predicts_what_training_learned(tmp_path):
    lines: list[str] = []
    never, never_result, never_acc = _fit("never", tmp_path / "never")
    auto, auto_result, auto_acc = _fit("auto", tmp_path / "auto", log=lines.append)
    assert never_result.batchnorm is None
    assert never_acc < 0.4  # the running statistics are still near 0 / 1: eval mode is far off
    assert auto_acc > 0.7 and auto_acc > never_acc + 0.3
    info = auto_result.batchnorm
    assert info["kept"] and info["policy"] == "auto" and info["images"] == 1200
    assert info["val_accuracy_running"] == auto_result.history[-1]["val_accuracy"]
    assert info["val_accuracy_recalibrated"] > info["val_accuracy_running"] + 0.3
    assert auto_result.val_accuracy == info["val_accuracy_recalibrated"]  # the returned model's score
    assert any(line.startswith("BatchNorm statistics re-estimated on 1200 training images") and "(kept)" in line
               for line in lines), lines
    # the weights are the same training's: only the statistics differ
    for (name, a), b in zip(never.named_parameters(), auto.parameters()):
        assert torch.equal(a, b), name


def test_the_re_estimate_is_the_average_of_batch_statistics():
    """momentum=None: running mean = mean of the batch means, running variance = mean of the batches' unbiased
    variances, over the seeded draw of rows (sorted within each batch), taken in eval mode except BatchNorm."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(96, 3, 5, 5)) * [[[[2.0]], [[0.5]], [[1.0]]]] + [[[[3.0]], [[-1.0]], [[0.0]]]]).astype(
        np.float32)
    bn = nn.BatchNorm2d(3, momentum=0.1)
    model = nn.Sequential(nn.Dropout(0.9), bn)  # dropout stays off: the statistics are of the images themselves
    model.train()
    used = batchnorm.recalibrate(model, x, batch_size=32, seed=5, max_images=64)
    assert used == 64 and model.training and bn.momentum == 0.1
    rows = np.random.default_rng(5).permutation(96)[:64]
    batches = [torch.from_numpy(x[np.sort(rows[i:i + 32])]) for i in (0, 32)]
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 2


def test_auto_keeps_the_running_statistics_unless_the_re_estimate_scores_higher():
    x, y, xv, yv, _, _ = _digits()
    model = _slow_momentum_cnn().eval()
    before = [b.clone() for b in batchnorm.statistics(model)]
    cfg = TrainConfig(batch_size=64, recalibrate_batchnorm="auto")
    # the running statistics already score 1.0 on validation: nothing can beat that, so they stay, bit for bit
    info = _recalibrate_batchnorm(model, cfg, x, xv, yv, [{"val_accuracy": 1.0}], 0, world(), lambda m: None)
    assert not info["kept"] and info["val_accuracy_recalibrated"] < 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, batchnorm.statistics(model)))
    assert "not kept" in batchnorm.describe(info)
    # 'always' keeps the re-estimate whatever it scores
    info = _recalibrate_batchnorm(model, TrainConfig(batch_size=64, recalibrate_batchnorm="always"), x, xv, yv,
                                  [{"val_accuracy": 1.0}], 0, world(), lambda m: None)
    assert info["kept"] and not torch.equal(before[0], batchnorm.statistics(model)[0])
    # a model without BatchNorm: nothing to do, nothing recorded
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert _recalibrate_batchnorm(plain, cfg, x, xv, yv, [{"val_accuracy": 0.5}], 0, world(), print) is None


def test_a_typo_in_the_policy_is_a_one_line_config_error():
    from edgekd.config import DistillConfig, parse_section
    from edgekd.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_section(DistillConfig, {"recalibrate_batchnorm": "sometimes"}, "p.yaml", prefix="distill")
    msg = str(err.value)
    assert "recalibrate_batchnorm" in msg and "auto" in msg and "\n" not in msg
