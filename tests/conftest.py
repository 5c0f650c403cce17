import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "pipelines" / "digits.yaml"


def run_cli(*args, timeout=900, env=None, cwd=None):
    """Run the real `edgekd` command line in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "edgekd", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env={**os.environ, **(env or {})})


def build_until_checkpoint(run_dir: Path, pipeline: Path, min_epoch: int, *extra, timeout: float = 180, **popen):
    """`edgekd build` started in the background, returned still running once its distill stage has checkpointed
    at least `min_epoch` epochs (to be killed or interrupted by the caller). stdout/stderr default to DEVNULL."""
    import time

    import torch

    ckpt = Path(run_dir) / "stages" / "distill.work" / "checkpoint.pt"
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, "-m", "edgekd", "build", "--pipeline", str(pipeline), "--run-dir",
                             str(run_dir), *map(str, extra)], cwd=REPO, **popen)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and torch.load(ckpt, weights_only=True)["epoch"] >= min_epoch:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be stopped"
    return proc


def write_pipeline(path: Path, base: Path = DIGITS, **sections) -> Path:
    """A copy of `base` with some sections updated (one level deep): write_pipeline(p, budget={...})."""
    cfg = yaml.safe_load(base.read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def stage_statuses(report: dict) -> dict:
    return {s["name"]: s["status"] for s in report["stages"]}


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """One real end-to-end build of pipelines/digits.yaml, shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    proc = run_cli("build", "--target", "android-arm64", "--pipeline", DIGITS, "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture
def digits_copy(digits_run, tmp_path):
    """A private copy of the shared build, for tests that change and rebuild it."""
    dst = tmp_path / "run"
    shutil.copytree(digits_run, dst)
    return dst
