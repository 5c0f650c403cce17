"""Data-parallel training (torch.distributed, gloo, 2 CPU processes): the same optimisation as one process, one set of
artifacts, the same cache and resume behaviour, clear errors.

The processes are real: torch.multiprocessing for the trainer-level checks, and `edgekd build --nproc 2` (torch's
elastic launcher, what torchrun uses) for the pipeline-level ones.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import DIGITS, REPO, build_until_checkpoint, read_report, run_cli, stage_statuses, write_pipeline
from edgekd.config import TrainConfig
from edgekd.distill.trainer import KDSettings, accuracy, predict_logits, predict_logits_shared, train


def _digits_arrays():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x[:1000], y[:1000].astype(np.int64), x[1000:1200], y[1000:1200].astype(np.int64)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # no BN, no dropout


def _fit(work_dir: Path) -> tuple[dict, list]:
    """Two epochs of KD (cached teacher logits) with a last batch of 1000 % 96 = 40 rows, SGD, cosine schedule."""
    x, y, xv, yv = _digits_arrays()
    teacher_logits = np.random.default_rng(1).normal(size=(len(x), 10)).astype(np.float32) * 3
    model = _model()
    cfg = TrainConfig(epochs=2, batch_size=96, lr=0.05, optimizer="sgd", lr_schedule="cosine")
    result = train(model, cfg, x, y, xv, yv, seed=3, work_dir=work_dir, kd=KDSettings(alpha=0.6, temperature=3.0),
                   teacher_logits=teacher_logits, log=lambda m: None)
    return {k: v.clone() for k, v in model.state_dict().items()}, result.history


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from edgekd import distributed

    w = distributed.init_from_env()
    assert w.is_distributed and w.backend == "gloo"
    state, history = _fit(Path(out_dir) / "work")
    model = _model()
    model.load_state_dict(state)
    shared = predict_logits_shared(model, _digits_arrays()[2][:199])  # 199 rows: the ranks get 100 and 99
    torch.save({"state": state, "history": history, "shared_logits": torch.from_numpy(shared)},
               Path(out_dir) / f"rank{rank}.pt")
    distributed.leave_together(w)  # ranks other than 0 exit here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_take_the_same_steps_as_one_process(tmp_path):
    """DDP over 2 ranks, each taking half of every global batch (its loss weighted by its share), follows the very
    trajectory of one process: same weights after 2 epochs up to float summation order, same logged epoch means."""
    (tmp_path / "single").mkdir()
    single_state, single_history = _fit(tmp_path / "single")
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, value in single_state.items():
        for r in ranks:
            assert torch.allclose(r["state"][name], value, atol=2e-5, rtol=1e-4), name
    for epoch_single, epoch_ddp in zip(single_history, ranks[0]["history"]):
        for key in ("loss", "kd", "ce", "val_accuracy"):
            assert epoch_ddp[key] == pytest.approx(epoch_single[key], rel=1e-4, abs=1e-6), key
    assert ranks[0]["history"] == ranks[1]["history"]  # metrics are reduced: every rank logs the same numbers
    # The teacher output cache's way of predicting: split among the ranks, gathered in order on every rank.
    model = _model()
    model.load_state_dict(ranks[0]["state"])
    expected = predict_logits(model, _digits_arrays()[2][:199])
    for r in ranks:
        np.testing.assert_allclose(r["shared_logits"].numpy(), expected, rtol=1e-5, atol=1e-5)
    # Only rank 0 checkpoints: one file, and it is the finished run's.
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["checkpoint.pt"]
    ckpt = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2


def _rgb_arrays():
    """3x32x32 images whose class is the dominant colour (3 classes): 240 train, 60 validation."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.uniform(0.0, 0.4, (300, 3, 32, 32)).astype(np.float32)
    x[np.arange(300), y] += 0.5
    return x[:240], y[:240].astype(np.int64), x[240:], y[240:].astype(np.int64)


def _real_arch() -> nn.Module:
    """torchvision's MobileNetV3-Small: BatchNorm everywhere, squeeze-excitation, hardswish, dropout."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=3, width_mult=0.25)


def _bn_rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from edgekd import distributed

    w = distributed.init_from_env()
    x, y, xv, yv = _rgb_arrays()
    model = _real_arch()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.003)
    result = train(model, cfg, x, y, xv, yv, seed=0, work_dir=Path(out_dir) / "work", log=lambda m: None)
    torch.save({"state": {k: v.clone() for k, v in model.state_dict().items()}, "history": result.history,
                "val_accuracy": result.val_accuracy, "batchnorm": result.batchnorm}, Path(out_dir) / f"bn_rank{rank}.pt")
    distributed.leave_together(w)


def test_batchnorm_model_is_one_model_on_every_rank(tmp_path):
    """DDP on a real architecture. Each rank's BatchNorm sees only its half of every batch (SyncBatchNorm needs a GPU),
    so the running statistics drift apart between ranks; the trainer averages them over the ranks after every epoch.
    Else the validation accuracy (and a teacher's cached logits, both computed split among the ranks) would come from a
    mix of models, none of them the one rank 0 saves."""
    pytest.importorskip("torchvision")
    mp.spawn(_bn_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"bn_rank{r}.pt", weights_only=True) for r in range(2)]
    buffers = [k for k in ranks[0]["state"] if "running_" in k]
    assert len(buffers) > 40
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name  # parameters and statistics alike
    # What the ranks logged is what the saved model scores, evaluated alone in one process.
    model = _real_arch()
    model.load_state_dict(ranks[0]["state"])
    _, _, xv, yv = _rgb_arrays()
    assert ranks[0]["val_accuracy"] == accuracy(predict_logits(model, xv), yv)
    # the BatchNorm re-estimate after training ran split among the ranks and was judged the same way on both
    assert ranks[0]["batchnorm"] == ranks[1]["batchnorm"] and ranks[0]["batchnorm"]["images"] == 240


def _tree(run_dir: Path) -> dict[str, float]:
    """Every file of a run dir (but the lock, which each build rewrites) with its modification time."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_distill_stage_on_two_processes(digits_copy, digits_run, tmp_path):
    """The digits pipeline's distill stage rerun with 2 gloo processes: accuracy within 1 point of the single-process
    run, exactly one set of artifacts (rank 0's), nothing left by the other rank; then a normal build finds the
    2-process output up to date."""
    before = _tree(digits_copy)
    scratch_before = set(Path("/tmp").glob("edgekd-rank*"))
    proc = run_cli("build", "--pipeline", DIGITS, "--run-dir", digits_copy, "--only", "distill", "--nproc", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training on 2 processes" in proc.stdout and "backend gloo" in proc.stdout
    # Rank 0 alone talks: each epoch is logged once.
    assert proc.stdout.count("[distill] epoch 1/") == 1

    single = json.loads((digits_run / "stages" / "distill" / "manifest.json").read_text())["data"]
    ddp = json.loads((digits_copy / "stages" / "distill" / "manifest.json").read_text())["data"]
    assert abs(ddp["test_accuracy_torch"] - single["test_accuracy_torch"]) <= 0.01
    assert ddp["test_accuracy_torch"] > 0.9 and ddp["train_processes"] == 2 and single["train_processes"] == 1

    after = _tree(digits_copy)
    changed = sorted(f for f in after if before.get(f) != after[f] and not f.startswith("store/"))
    assert changed == ["stages/distill/manifest.json", "stages/distill/student.pt"]
    # no extra files: no second student, no rank-1 checkpoint, no temp folder; the stage store holds the new distill
    # output under its key (same config, so the single-process entry of that key is replaced whole)
    new = sorted(set(after) - set(before))
    assert {Path(f).parts[:2] for f in new} <= {("store", "distill")}, new
    stored = [p for p in (digits_copy / "store" / "distill").glob("*/student.pt")]
    assert (digits_copy / "stages" / "distill" / "student.pt").read_bytes() in [p.read_bytes() for p in stored]
    assert set(Path("/tmp").glob("edgekd-rank*")) == scratch_before

    # The cache does not care how many processes trained: the rest of the pipeline reruns from the new student,
    # and a second build (one process) has nothing to do.
    proc = run_cli("build", "--pipeline", DIGITS, "--run-dir", digits_copy)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    statuses = stage_statuses(read_report(digits_copy))
    assert statuses["distill"] == "cached" and statuses["export_onnx"] == "ran"
    proc = run_cli("build", "--pipeline", DIGITS, "--run-dir", digits_copy, "--nproc", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(stage_statuses(read_report(digits_copy)).values()) <= {"cached", "skipped"}


@pytest.mark.slow
def test_killed_two_process_distill_resumes_from_its_checkpoint(digits_copy, tmp_path):
    """kill -9 of a 2-process build mid-distill (launcher and ranks), then a 2-process rebuild: it resumes from rank
    0's last checkpoint (read by both ranks) and finishes every epoch; upstream stages stay cached."""
    pipeline = write_pipeline(tmp_path / "long.yaml", name="digits", distill={"epochs": 40, "temperature": 5.0})
    ckpt = digits_copy / "stages" / "distill.work" / "checkpoint.pt"
    proc = build_until_checkpoint(digits_copy, pipeline, 3, "--nproc", "2", start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert 3 <= killed_at < 40
    again = run_cli("build", "--pipeline", pipeline, "--run-dir", digits_copy, "--nproc", "2")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    resumed = [ln for ln in again.stdout.splitlines() if "resuming from the checkpoint after epoch" in ln]
    assert len(resumed) == 1 and int(resumed[0].split("after epoch ")[1].split("/")[0]) >= killed_at
    r = read_report(digits_copy)
    assert stage_statuses(r)["teacher"] == "cached" and stage_statuses(r)["distill"] == "ran"
    data = json.loads((digits_copy / "stages/distill/manifest.json").read_text())["data"]
    assert len(data["history"]) == 40 and data["resumed_from_epoch"] >= killed_at
    assert min(a["accuracy"] for a in r["artifacts"]) > 0.85


def test_nproc_bad_values_are_one_line_errors(tmp_path):
    proc = run_cli("build", "--pipeline", DIGITS, "--run-dir", tmp_path / "r", "--nproc", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "edgekd: error: --nproc 0: must be at least 1"
    proc = run_cli("build", "--pipeline", DIGITS, "--run-dir", tmp_path / "r", "--nproc", "2",
                   env={"WORLD_SIZE": "2", "RANK": "0"})
    assert proc.returncode == 2 and "torchrun" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_config_error_under_two_processes_is_one_line(tmp_path):
    """Every rank hits the same bad pipeline; the user reads it once, without a launcher traceback."""
    bad = write_pipeline(tmp_path / "bad.yaml", distill={"temprature": 4.0})
    proc = run_cli("build", "--pipeline", bad, "--run-dir", tmp_path / "r", "--nproc", "2", timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgekd: error: ") and "temperature" in lines[0], proc.stderr


@pytest.mark.slow
def test_a_diverging_loss_under_two_processes_stops_every_rank_with_one_line(digits_copy, tmp_path):
    """A non-finite loss is decided collectively: both ranks stop at the same step, rank 0 marks the stage failed
    and says so once; the upstream stages stay cached."""
    cfg = write_pipeline(tmp_path / "nan.yaml", distill={"lr": 1.0e30})
    proc = run_cli("build", "--pipeline", cfg, "--run-dir", digits_copy, "--nproc", "2", timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "stage distill: loss became" in lines[0], proc.stderr
    failed = json.loads((digits_copy / "stages" / "distill.failed.json").read_text())
    assert "loss became" in failed["error"]
    assert (digits_copy / "stages" / "teacher" / "manifest.json").is_file()


@pytest.mark.slow
def test_prune_recovery_and_qat_on_two_processes(tmp_path):
    """The compression pipeline end to end under 2 processes: the pruned student recovers and the QAT model (its
    fake-quantizers trained under DDP) exports to an int8 ONNX that runs integer kernels and keeps its accuracy."""
    run_dir = tmp_path / "run"
    proc = run_cli("build", "--pipeline", REPO / "pipelines" / "digits-compress.yaml", "--run-dir", run_dir,
                   "--nproc", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    statuses = stage_statuses(read_report(run_dir))
    assert statuses["prune"] == "ran" and statuses["qat"] == "ran"
    prune = json.loads((run_dir / "stages" / "prune" / "manifest.json").read_text())["data"]
    qat = json.loads((run_dir / "stages" / "qat" / "manifest.json").read_text())["data"]
    assert prune["params_after"] < prune["params_before"]
    assert prune["test_accuracy_after_recovery"] > 0.9 and prune["recovery"]["history"]
    assert qat["test_accuracy_onnxruntime"] > 0.9
    assert abs(qat["test_accuracy_onnxruntime"] - qat["test_accuracy_torch_converted"]) <= 0.002
    assert "QLinearConv" in qat["onnx"]["onnxruntime_optimized_op_types"]
    assert not list((run_dir / "stages").glob(".*tmp*")) and not list((run_dir / "stages").glob("*.work"))


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_with_one_line(digits_copy, tmp_path):
    """SIGINT to `edgekd build --nproc 2` mid-distill: exit 130, one line, no rank left running (the launcher stops
    them), the checkpoint kept for the next build."""
    pipeline = write_pipeline(tmp_path / "long.yaml", name="digits", distill={"epochs": 400})
    ckpt = digits_copy / "stages" / "distill.work" / "checkpoint.pt"
    proc = build_until_checkpoint(digits_copy, pipeline, 1, "--nproc", "2", stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["edgekd: interrupted; finished stages are kept, rerun to continue"], err
    assert ckpt.is_file()
    left = subprocess.run(["pgrep", "-f", str(digits_copy)], capture_output=True, text=True).stdout.split()
    assert not left, f"ranks still running: {left}"


@pytest.mark.slow
def test_the_documented_multi_node_command(digits_copy, digits_run):
    """README's several-machines form, as two torchrun "nodes" of one process each on this host (c10d rendezvous,
    the run dir shared because it is the same disk): the distill stage trains on both and rank 0 writes it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{_free_port()}", "--rdzv-id", "edgekd-test",
           "-m", "edgekd", "build", "--pipeline", str(DIGITS), "--run-dir", str(digits_copy), "--only", "distill"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    said = [out for out, _ in outs if "training on 2 processes (2 node(s) x 1), backend gloo" in out]
    assert len(said) == 1  # rank 0's node talks, the other node's rank is silent
    single = json.loads((digits_run / "stages" / "distill" / "manifest.json").read_text())["data"]
    ddp = json.loads((digits_copy / "stages" / "distill" / "manifest.json").read_text())["data"]
    assert ddp["train_processes"] == 2
    assert abs(ddp["test_accuracy_torch"] - single["test_accuracy_torch"]) <= 0.01
