"""Where edgekd finds its shipped pipelines and target profiles."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
PIPELINES_DIR = REPO_ROOT / "pipelines"
DEVICES_DIR = REPO_ROOT / "devices"
DEFAULT_PIPELINE = PIPELINES_DIR / "fashion-mnist.yaml"
