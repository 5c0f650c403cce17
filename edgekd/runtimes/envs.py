"""Runtime environments: the Python a target's measurement runs in, created on demand and reused.

`host` is edgekd's own interpreter. Any other name is a separate virtual environment with its own pinned
requirements, because a target's runtime may not fit next to edgekd's stack: onnxruntime-qnn 2.7.0 (QNN EP with
the HTP simulator) needs onnxruntime >= 1.24.2, while onnx2tf pins onnxruntime 1.23.0.

An environment lives in `$EDGEKD_ENV_DIR/<name>-<hash>` (default `$XDG_CACHE_HOME/edgekd/envs`, i.e.
`~/.cache/edgekd/envs`); the hash covers its requirements, the Python version and the platform, so changing a pin
makes a new one and never half-updates an old one. It is built in a temporary folder (venv + `pip install` from
the package index, with progress on the build log) and renamed into place only after an import check passed; a
file lock keeps two builds from creating the same environment at once. The measuring code runs there as
`python -m edgekd.runtimes.bench_worker` with edgekd's package folder on PYTHONPATH: the worker imports only
numpy and onnxruntime, so nothing else of edgekd's stack is needed in the environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgekd.errors import EdgekdError
from edgekd.paths import PACKAGE_DIR
from edgekd.pipeline.store import sha256_json


@dataclass(frozen=True)
class EnvSpec:
    name: str
    requirements: tuple[str, ...]
    check: str  # Python run in the new environment; must exit 0
    platforms: tuple[tuple[str, str], ...]  # (platform.system(), platform.machine()) it can be built on
    description: str
    # An overlay sees edgekd's own site-packages (torch, torchvision, timm, torchao) behind its own: only the
    # packages that conflict with edgekd's pins or are missing there are installed (litert-torch: ~1 GB instead
    # of a second 8 GB torch stack). Its key then also covers the host's torch version and site-packages path.
    overlay_host: bool = False


ENVS: dict[str, EnvSpec] = {
    "qnn": EnvSpec(
        name="qnn",
        # Exact pins (the set pip resolved for onnxruntime-qnn==2.7.0 on Python 3.11, Linux x86_64).
        requirements=("onnxruntime-qnn==2.7.0", "onnxruntime==1.32.0", "numpy==2.4.6", "protobuf==7.36.2",
                      "flatbuffers==25.12.19", "coloredlogs==15.0.1", "humanfriendly==10.0", "packaging==26.3",
                      "sympy==1.14.0", "mpmath==1.3.0"),
        check=("import os, onnxruntime, onnxruntime_qnn; "
               "assert os.path.isfile(onnxruntime_qnn.get_library_path()); "
               "assert os.path.isfile(onnxruntime_qnn.get_qnn_htp_path())"),
        platforms=(("Linux", "x86_64"),),
        description="onnxruntime + QNN execution provider with Qualcomm's HTP simulator (libQnnHtp.so)",
    ),
    "litert-torch": EnvSpec(
        name="litert-torch",
        # Google's PyTorch -> TFLite converter. litert-torch 0.10.0 needs ai-edge-litert 2.3.x (onnx2tf 1.29.24 pins
        # 2.1.0) and jax (numpy >= 2; TensorFlow 2.19 needs numpy < 2.2): it cannot live in edgekd's venv. Exact
        # pins: the set pip resolved next to edgekd's torch 2.14.1 on Python 3.11, Linux x86_64.
        requirements=("litert-torch==0.10.0", "ai-edge-litert==2.3.0", "ai-edge-quantizer==0.10.0",
                      "litert-converter==0.5.0", "litert-lm-builder==0.18.1", "jax==0.10.2", "jaxlib==0.10.2",
                      "jaxtyping==0.3.11", "numpy==2.4.6", "transformers==5.24.0", "tokenizers==0.23.3",
                      "kagglehub==1.0.3", "kagglesdk==0.1.38", "xdsl==0.28.0", "lark==1.3.1",
                      "sentencepiece==0.2.3", "pydantic==2.11.10", "pydantic_core==2.33.2",
                      "typing_extensions==4.12.2", "typing-inspection==0.4.2", "regex==2026.11.19",
                      "multipledispatch==1.0.0", "fire==0.7.1", "immutabledict==4.2.1", "ordered-set==4.1.0",
                      "tabulate==0.10.0", "wadler_lindig==0.1.8", "anyio==4.14.2", "tomli==2.5.0"),
        check="import torch, litert_torch, ai_edge_litert; from torchao.quantization.pt2e import quantize_pt2e",
        platforms=(("Linux", "x86_64"), ("Linux", "aarch64"), ("Darwin", "arm64")),
        description="litert-torch (PyTorch -> TFLite converter with a PT2E int8 quantizer) over edgekd's torch",
        overlay_host=True,
    ),
}

MARKER = "edgekd-env.json"


def env_root() -> Path:
    if os.environ.get("EDGEKD_ENV_DIR"):
        return Path(os.environ["EDGEKD_ENV_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "edgekd" / "envs"


def host_site_packages() -> str:
    """edgekd's own site-packages (where torch is installed): what an overlay environment sees behind its own."""
    import torch

    return str(Path(torch.__file__).resolve().parent.parent)


def env_key(spec: EnvSpec) -> str:
    key = {"requirements": sorted(spec.requirements), "python": platform.python_version_tuple()[:2],
           "system": platform.system(), "machine": platform.machine()}
    if spec.overlay_host:
        import torch

        key["host"] = {"site_packages": host_site_packages(), "torch": torch.__version__}
    return sha256_json(key)[:12]


def env_dir(name: str) -> Path:
    spec = ENVS[name]
    return env_root() / f"{name}-{env_key(spec)}"


def worker_env(extra: dict | None = None) -> dict:
    """Environment variables for a worker in another environment: edgekd's package folder on PYTHONPATH, and
    nothing inherited that would point it at edgekd's own site-packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(PACKAGE_DIR.parent)
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra or {})
    return env


def ensure_env(name: str, log: Callable[[str], None] = print) -> dict:
    """The Python executable of runtime environment `name`, creating the environment if needed.

    Returns {"name", "python", "path", "created": bool, "seconds", "versions"}."""
    if name == "host":
        return {"name": "host", "python": sys.executable, "path": sys.prefix, "created": False, "seconds": 0.0,
                "versions": {}}
    if name not in ENVS:
        raise EdgekdError(f"unknown runtime environment {name!r} (host, {', '.join(ENVS)})")
    spec = ENVS[name]
    here = (platform.system(), platform.machine())
    if here not in spec.platforms:
        raise EdgekdError(f"runtime environment {name!r} ({spec.description}) can only be built on "
                          f"{', '.join('/'.join(p) for p in spec.platforms)}, not {'/'.join(here)}")
    path = env_dir(name)
    t0 = time.perf_counter()
    with creation_lock(path, log, f"runtime environment {name}"):
        info = _existing(path, spec)
        if info is not None:
            return {**info, "created": False, "seconds": round(time.perf_counter() - t0, 2)}
        if path.exists():
            log(f"runtime environment {name}: {path} is incomplete or broken; recreating it")
            shutil.rmtree(path, ignore_errors=True)
        info = _create(path, spec, log)
    return {**info, "created": True, "seconds": round(time.perf_counter() - t0, 2)}


@contextmanager
def creation_lock(path: Path, log: Callable[[str], None], what: str):
    """Held while the environment at `path` is checked or created: two builds never create one at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{what}: another edgekd process is creating {path}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _python(path: Path) -> Path:
    return path / "bin" / "python"


def _existing(path: Path, spec: EnvSpec) -> dict | None:
    marker = path / MARKER
    if not marker.is_file() or not _python(path).exists():
        return None
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return None
    if info.get("requirements") != list(spec.requirements):
        return None
    proc = subprocess.run([str(_python(path)), "-c", spec.check], capture_output=True, text=True, timeout=300,
                          env=worker_env())
    return info if proc.returncode == 0 else None


def _create(path: Path, spec: EnvSpec, log: Callable[[str], None]) -> dict:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    log(f"runtime environment {spec.name}: creating {path} ({spec.description}); first use only, "
        f"installs {len(spec.requirements)} pinned packages from the package index (about a minute)")
    try:
        _run([sys.executable, "-m", "venv", "--clear", str(tmp)], log, spec.name, "venv")
        if spec.overlay_host:  # a path line: appended to sys.path after the environment's own site-packages
            site = subprocess.run([str(_python(tmp)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
            (Path(site) / "zz-edgekd-host.pth").write_text(host_site_packages() + "\n")
        # The venv's scripts carry the temporary path; only bin/python is used, which resolves either way.
        req = tmp / "requirements.txt"
        req.write_text("\n".join(spec.requirements) + "\n")
        # An overlay's pins are installed without dependency resolution: everything else comes from the host's
        # site-packages, which pip must neither upgrade nor uninstall (the import check below proves the set).
        _run([str(_python(tmp)), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
              "--progress-bar", "off", *(["--no-deps"] if spec.overlay_host else []), "-r", str(req)],
             log, spec.name, "pip")
        versions = json.loads(subprocess.run(
            [str(_python(tmp)), "-c", "import json, importlib.metadata as m; "
             "v = {}\n"
             "for d in m.distributions(): v.setdefault(d.metadata['Name'].lower(), d.version)\n"
             "print(json.dumps(v))"],
            capture_output=True, text=True, check=True, env=worker_env()).stdout)
        check = subprocess.run([str(_python(tmp)), "-c", spec.check], capture_output=True, text=True, timeout=300,
                               env=worker_env())
        if check.returncode != 0:
            raise EdgekdError(f"runtime environment {spec.name}: import check failed after install: "
                              f"{(check.stderr.strip().splitlines() or ['no output'])[-1]}")
        info = {"name": spec.name, "python": str(_python(path)), "path": str(path),
                "requirements": list(spec.requirements), "versions": versions,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "create_seconds": round(time.perf_counter() - t0, 1)}
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    log(f"runtime environment {spec.name}: ready in {info['create_seconds']:.0f} s ({size / 2**20:.0f} MiB): "
        + ", ".join(f"{d} {versions.get(d)}" for d in ("onnxruntime", "onnxruntime-qnn", "litert-torch", "ai-edge-litert",
                                                      "numpy") if d in versions))
    return info


_PROGRESS = ("Collecting", "Downloading", "Using cached", "Installing collected", "Successfully installed")


def _run(cmd: list[str], log: Callable[[str], None], name: str, what: str) -> None:
    """Run an install step, relaying pip's progress lines (and a heartbeat) to the build log."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**worker_env(), "PIP_NO_INPUT": "1"})
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if not line:
            continue
        tail = (tail + [line])[-20:]
        if line.lstrip().startswith(_PROGRESS):
            log(f"runtime environment {name}: [{time.perf_counter() - t0:5.1f} s] {line.strip()[:160]}")
    code = proc.wait()
    if code != 0:
        errors = [ln for ln in tail if "error" in ln.lower()] or tail[-3:] or ["no output"]
        raise EdgekdError(f"runtime environment {name}: {what} failed (exit {code}): {errors[-1].strip()[:300]}")
