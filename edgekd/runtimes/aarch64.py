"""The aarch64 runner: the target's own runtimes (the aarch64 builds of onnxruntime and ai-edge-litert from PyPI)
run on this x86 host under QEMU's user-mode emulation, so an ARM target's accuracy comes from ARM arithmetic.

Why: an x86 host computes some int8 models differently from the phone. Without VNNI, onnxruntime's AVX2 int8
kernels saturate on S8S8 models (the default student loses 2.2 points there, 0.0 on aarch64). The aarch64 kernels
under emulation give the phone's answer, bit for bit the same across the emulated CPU models.

The environment, created on first use, cached and reused (like the QNN one, edgekd/runtimes/envs.py):
- a minimal Debian arm64 root with its Python (debootstrap's first stage, `--foreign`: binfmt_misc is not needed,
  then `dpkg -x` of the downloaded packages), from the mirror apt uses on this host;
- the aarch64 wheels of the host's onnxruntime, ai-edge-litert and numpy versions (`pip install --target`);
- one view of the root per emulated CPU model, whose proc/cpuinfo matches that CPU (QEMU's -L prefix serves it):
  the runtimes pick their kernels from it, and an int8 kernel picked for a dot-product CPU dies with SIGILL on a
  CPU without one;
- an instruction-counting TCG plugin (edgekd/runtimes/insn_count.c), built with gcc, for `count`.

It needs Debian's `qemu-user` (the dynamically linked qemu-aarch64, which loads TCG plugins) and `debootstrap`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from edgekd.errors import EdgekdError
from edgekd.paths import PACKAGE_DIR
from edgekd.pipeline.store import sha256_json
from edgekd.runtimes.envs import creation_lock, env_root

DEBIAN_SUITE = "bookworm"  # Python 3.11, like edgekd's own
MARKER_SYSCALL = 0x4544  # the syscall number insn_count.c watches for (an unused one: the kernel says ENOSYS)
PLUGIN_SOURCE = PACKAGE_DIR / "runtimes" / "insn_count.c"
WHEEL_PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_27_aarch64",
                   "manylinux_2_28_aarch64")

# QEMU 7.2's aarch64 CPU models edgekd knows: MIDR implementer and part number (what /proc/cpuinfo shows and the
# runtimes' CPU detection reads), and a description for reports.
CPUS: dict[str, tuple[int, int, str]] = {
    "cortex-a53": (0x41, 0xd03, "Arm Cortex-A53 (Armv8.0-A, no dot-product instructions)"),
    "cortex-a57": (0x41, 0xd07, "Arm Cortex-A57 (Armv8.0-A, no dot-product instructions)"),
    "cortex-a72": (0x41, 0xd08, "Arm Cortex-A72 (Armv8.0-A, no dot-product instructions)"),
    "cortex-a76": (0x41, 0xd0b, "Arm Cortex-A76 (Armv8.2-A with dot-product, fp16)"),
    "neoverse-n1": (0x41, 0xd0c, "Arm Neoverse N1 (Armv8.2-A with dot-product, fp16)"),
}
# Linux's arm64 HWCAP bit names, in bit order (arch/arm64/include/uapi/asm/hwcap.h), for the Features line.
HWCAP_NAMES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
               "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()


@dataclass(frozen=True)
class Aarch64Env:
    path: Path  # the environment's folder
    root: Path  # the Debian arm64 root
    site: Path  # the aarch64 wheels (PYTHONPATH)
    qemu: str  # qemu-aarch64 (dynamic build: loads plugins)
    versions: dict  # distribution -> version inside the environment

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / "python3"


def host_runtime_versions() -> dict[str, str]:
    """The runtime versions to mirror in the aarch64 environment: the ones edgekd itself runs."""
    out = {}
    for dist in ("onnxruntime", "ai-edge-litert", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            raise EdgekdError(f"aarch64 runner: {dist} is not installed in edgekd's environment") from None
    return out


def _requirements() -> list[str]:
    return [f"{d}=={v}" for d, v in sorted(host_runtime_versions().items())]


def env_path() -> Path:
    key = sha256_json({"suite": DEBIAN_SUITE, "requirements": _requirements(), "layout": 2})[:12]
    return env_root() / f"aarch64-{key}"


def _need_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise EdgekdError(f"aarch64 runner: {name} not found; install Debian's {package} "
                          f"(apt-get install qemu-user debootstrap), or run `make setup`")
    return found


def debian_mirror() -> str:
    """The Debian mirror apt uses on this host ($EDGEKD_DEBIAN_MIRROR overrides it)."""
    if os.environ.get("EDGEKD_DEBIAN_MIRROR"):
        return os.environ["EDGEKD_DEBIAN_MIRROR"]
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(p.read_text())
        except OSError:
            continue
    for text in texts:
        for m in re.finditer(r"^\s*(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            uri = m.group(1).rstrip("/")
            if uri.startswith(("http://", "https://", "file:/")) and "security" not in uri:
                return uri
    raise EdgekdError("aarch64 runner: no Debian mirror found in /etc/apt/sources.list*; set EDGEKD_DEBIAN_MIRROR")


def ensure_env(log: Callable[[str], None] = print) -> Aarch64Env:
    """The aarch64 environment, created on first use (about 1-2 minutes, about 500 MB) and reused after."""
    qemu = _need_tool("qemu-aarch64", "qemu-user")
    path = env_path()
    with creation_lock(path, log, "aarch64 runner"):
        marker = path / "edgekd-env.json"
        if not marker.is_file():
            shutil.rmtree(path, ignore_errors=True)
            _create(path, qemu, log)
        info = json.loads(marker.read_text())
    return Aarch64Env(path, path / "root", path / "site", qemu, info["versions"])


def _create(path: Path, qemu: str, log: Callable[[str], None]) -> None:
    debootstrap = _need_tool("debootstrap", "debootstrap")
    free = shutil.disk_usage(path.parent).free
    if free < 1 << 30:
        raise EdgekdError(f"aarch64 runner: {free / 2**20:.0f} MiB free under {path.parent}; creating the "
                          f"environment needs about 1 GiB (set EDGEKD_ENV_DIR to another disk)")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    log(f"aarch64 runner: creating {path} (Debian {DEBIAN_SUITE} arm64 root + {', '.join(_requirements())}); "
        f"first use only, about 2 minutes")
    try:
        root = tmp / "root"
        _step([debootstrap, "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3", DEBIAN_SUITE,
               str(root), debian_mirror()], "debootstrap")
        # First stage only (its second stage would need binfmt_misc): unpack the downloaded packages ourselves.
        debs = sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
        for deb in debs:
            _step(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
            deb.unlink()
        # Debian compiles its Python's bytecode in a package script that never ran here; without it every emulated
        # start compiles the standard library again (seconds). The host's 3.11 writes the same bytecode format.
        # (A file that does not compile only stays uncompiled: no reason to fail.)
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-d", "/usr/lib/python3.11",
                        str(root / "usr" / "lib" / "python3.11")], capture_output=True)
        platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
        _step([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q",
               "--target", str(tmp / "site"), *platforms, "--only-binary=:all:", "--python-version", "3.11",
               "--implementation", "cp", *_requirements()], "pip (aarch64 wheels)")
        check = subprocess.run([qemu, "-L", str(root), str(root / "usr/bin/python3"), "-c",
                                "import json, platform, importlib.metadata as m, onnxruntime, ai_edge_litert.interpreter;"
                                "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),"
                                "**{d: m.version(d) for d in ('onnxruntime', 'ai-edge-litert', 'numpy')}}))"],
                               capture_output=True, text=True, timeout=600, env=_guest_env(tmp / "site"))
        if check.returncode != 0:
            raise EdgekdError("aarch64 runner: the emulated runtimes do not import: "
                              + (check.stderr.strip().splitlines() or ["no output"])[-1][:300])
        versions = json.loads(check.stdout.strip().splitlines()[-1])
        (tmp / "edgekd-env.json").write_text(json.dumps({
            "versions": versions, "suite": DEBIAN_SUITE, "requirements": _requirements(),
            "qemu": _qemu_version(qemu), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "create_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
        os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgekdError(f"aarch64 runner: cannot create {path}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    log(f"aarch64 runner: ready in {time.perf_counter() - t0:.0f} s ({size / 2**20:.0f} MiB)")


def _step(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        errors = [ln for ln in lines if re.search(r"error|E:|failed|No space", ln, re.I)] or lines
        raise EdgekdError(f"aarch64 runner: {what} failed (exit {proc.returncode}): {errors[-1].strip()[:300]}")


def _qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "unknown"


def _guest_env(site: Path | str, src: Path | str = PACKAGE_DIR.parent) -> dict:
    """The emulated Python's environment: the aarch64 wheels and edgekd's own package (its runners import only
    numpy and the runtime), single-threaded BLAS, a fixed hash seed (instruction counts repeat exactly)."""
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}{os.pathsep}{src}",
            "PYTHONNOUSERSITE": "1", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "HOME": "/tmp", "LANG": "C.UTF-8"}


def check_cpu(cpu: str) -> None:
    if cpu not in CPUS:
        raise EdgekdError(f"unknown emulated CPU {cpu!r}; one of {', '.join(CPUS)}")


def _unique() -> str:
    """A temporary name no other process or thread uses at the same time."""
    import threading

    return f"{os.getpid()}-{threading.get_ident()}"


def cpu_view(env: Aarch64Env, cpu: str) -> Path:
    """The root as a program on `cpu` sees it: symlinks to the shared root plus a proc/cpuinfo of that CPU
    (its features read from the HWCAPs QEMU gives the emulated program)."""
    check_cpu(cpu)
    view = env.path / "views" / cpu
    if (view / "proc" / "cpuinfo").is_file():
        return view
    tmp = env.path / "views" / f".{cpu}.tmp-{_unique()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "proc").mkdir(parents=True)
    for entry in env.root.iterdir():
        if entry.name != "proc":
            (tmp / entry.name).symlink_to(entry)
    probe = subprocess.run([env.qemu, "-cpu", cpu, "-L", str(env.root), str(env.python), "-c",
                            "import ctypes; f = ctypes.CDLL(None).getauxval; f.restype = ctypes.c_ulong; print(f(16))"],
                           capture_output=True, text=True, timeout=300, env=_guest_env(env.site))
    if probe.returncode != 0:
        raise EdgekdError(f"aarch64 runner: cannot start the emulated {cpu}: "
                          + (probe.stderr.strip().splitlines() or ["no output"])[-1][:200])
    hwcap = int(probe.stdout.split()[-1])
    features = " ".join(n for i, n in enumerate(HWCAP_NAMES) if hwcap >> i & 1)
    implementer, part, _ = CPUS[cpu]
    blocks = [f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: {implementer:#x}\n"
              f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part:#x}\nCPU revision\t: 0\n"
              for i in range(os.cpu_count() or 1)]
    (tmp / "proc" / "cpuinfo").write_text("\n".join(blocks))
    try:
        os.replace(tmp, view)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return view


def plugin(env: Aarch64Env) -> Path:
    """The instruction-counting TCG plugin, built with gcc on first use (keyed by its source)."""
    source = PLUGIN_SOURCE.read_bytes()
    lib = env.path / "plugins" / f"insn_count-{sha256_json(source.decode())[:12]}.so"
    if lib.is_file():
        return lib
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise EdgekdError("aarch64 runner: counting instructions needs a C compiler (gcc) to build QEMU's plugin")
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".tmp-{_unique()}.so")
    _step([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(PLUGIN_SOURCE)], "building the instruction counter")
    os.replace(tmp, lib)
    return lib


# What the emulated Python imports of edgekd: copied into each run's view as plain source (see _sandbox).
WORKER_SOURCES = ("__init__.py", "errors.py", "runtimes/__init__.py", "runtimes/arm_worker.py",
                  "runtimes/ort_runner.py", "runtimes/tflite_runner.py")
GUEST_IO = "/edgekd-io"  # where a run's inputs and outputs appear to the emulated program


def _sandbox(env: Aarch64Env, cpu: str, tmp: Path, files: dict[str, Path | None]) -> Path:
    """A private view of the root for one emulated run, in which every path the program sees is the same on every
    host and checkout: /edgekd-site (the aarch64 wheels), /edgekd-src (edgekd's worker modules, plain source) and
    /edgekd-io (this run's files, linked by name; None: an output file). The cost a count reports includes the
    Python around the runtime call, and that depends on the lengths of the strings the process holds (paths
    included, they shift its heap), so a count must not see where a run directory or a checkout happens to be."""
    view = tmp / "root"
    (view / "proc").mkdir(parents=True)
    shutil.copyfile(cpu_view(env, cpu) / "proc" / "cpuinfo", view / "proc" / "cpuinfo")
    for entry in env.root.iterdir():
        if entry.name != "proc":
            (view / entry.name).symlink_to(entry)
    (view / "edgekd-site").symlink_to(env.site)
    for rel in WORKER_SOURCES:
        dst = view / "edgekd-src" / "edgekd" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_DIR / rel, dst)
    io = view / GUEST_IO.lstrip("/")
    io.mkdir()
    for name, path in files.items():
        if path is None:  # an output: QEMU maps a path into the view only when it exists there, so create it
            (io / name).touch()
        else:
            (io / name).symlink_to(Path(path).resolve())
    return view


def _run_in_sandbox(env: Aarch64Env, cpu: str, spec: dict, files: dict[str, Path | None], tmp: Path,
                    count: bool = False, timeout: float = 3600) -> dict:
    """Run edgekd.runtimes.arm_worker with `spec` on the emulated `cpu`, in a sandbox under `tmp` where `files`
    (name -> host path) appear as /edgekd-io/<name>; what the worker writes there lands in tmp/root/edgekd-io.
    With `count`, the result gains "instructions": {tag: guest instructions executed between the markers}."""
    view = _sandbox(env, cpu, tmp, files)
    cmd = [env.qemu, "-0", "/usr/bin/python3", "-cpu", cpu, "-L", str(view)]
    counts = tmp / "counts.txt"
    if count:
        cmd += ["-plugin", f"{plugin(env)},out={counts}"]
    cmd += [str(view / "usr" / "bin" / "python3"), "-m", "edgekd.runtimes.arm_worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/",
                              env=_guest_env("/edgekd-site", "/edgekd-src"))
    except subprocess.TimeoutExpired:
        raise EdgekdError(f"aarch64 runner: the emulated {cpu} run took longer than {timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = json.loads(lines[-1]).get("error") if lines else None
        if not why:
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            if proc.returncode < 0:
                why = f"killed by signal {-proc.returncode} ({why})"
        raise EdgekdError(f"aarch64 runner ({cpu}): {why[:300]}")
    result = json.loads(lines[-1])
    if count:
        result["instructions"] = {int(tag): int(n) for tag, n in
                                  (ln.split() for ln in counts.read_text().splitlines() if ln.strip())}
    return result


def _parallel(tasks: list[Callable[[], dict]], workers: int) -> list[dict]:
    """Run emulation tasks (each its own QEMU process) side by side: emulation is single-threaded per process."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda task: task(), tasks))


def _split(items: list, parts: int, weight: Callable[[object], float]) -> list[list]:
    """items in at most `parts` non-empty groups of about equal total weight, heaviest first into the lightest group
    (one emulated process each: starting the emulated Python and its runtimes costs seconds, so a process serves
    several models; float models cost far more than int8 ones under emulation, so they go to different processes)."""
    groups: list[list] = [[] for _ in range(max(1, min(parts, len(items))))]
    loads = [0.0] * len(groups)
    for item in sorted(items, key=weight, reverse=True):
        g = loads.index(min(loads))
        groups[g].append(item)
        loads[g] += weight(item)
    return [g for g in groups if g]


def predict(env: Aarch64Env, cpu: str, models: list[tuple[str, str]], x, batch_size: int = 256,
            workers: int | None = None) -> dict[str, dict]:
    """Logits of each model [(path, runtime)] for x (N, C, H, W) float32, computed by the aarch64 runtimes on the
    emulated `cpu`, in `workers` processes side by side (default: the host's cores).
    Returns {path: {"logits": (N, K) float32, "runtime_version", "seconds"}}."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="edgekd-arm-eval-") as tmp:
        inputs = Path(tmp) / "x.npy"
        np.save(inputs, np.ascontiguousarray(x, dtype=np.float32))
        jobs = [(i, str(path), runtime) for i, (path, runtime) in enumerate(models)]
        # a model's file size stands in for its emulated cost (an fp32 file is about 4x its int8 twin)
        groups = _split(jobs, workers or os.cpu_count() or 1, weight=lambda job: Path(job[1]).stat().st_size)

        def task(g: int, group: list) -> Callable[[], dict]:
            files = {"x.npy": inputs, **{f"model_{i}{Path(path).suffix}": Path(path) for i, path, _ in group},
                     **{f"logits_{i}.npy": None for i, _, _ in group}}
            spec = {"mode": "evaluate", "input_npy": f"{GUEST_IO}/x.npy", "batch_size": batch_size,
                    "jobs": [{"path": f"{GUEST_IO}/model_{i}{Path(path).suffix}", "runtime": runtime,
                              "out_npy": f"{GUEST_IO}/logits_{i}.npy"} for i, path, runtime in group]}
            work = Path(tmp) / f"run_{g}"
            return lambda: {**_run_in_sandbox(env, cpu, spec, files, work), "io": work / "root" / GUEST_IO[1:]}

        results = _parallel([task(g, group) for g, group in enumerate(groups)], len(groups))
        out = {}
        for group, result in zip(groups, results):
            for (i, path, _), done in zip(group, result["jobs"]):
                out[path] = {"logits": np.load(result["io"] / f"logits_{i}.npy"),
                             "runtime_version": done["runtime_version"], "seconds": done["seconds"]}
    return out


def count_instructions(env: Aarch64Env, cpus: list[str], models: list[tuple[str, str]], x1, warmup: int = 2,
                       runs: int = 3, workers: int | None = None) -> dict[str, dict[str, int]]:
    """Emulated aarch64 instructions per inference of each model [(path, runtime)] on the input x1 (1, C, H, W),
    on each CPU: {path: {cpu: instructions per inference}}.

    Each (model, CPU) gets a process of its own, started the same way every time, in a sandbox where the model is
    /edgekd-io/model.<ext> (_sandbox): the count includes the Python call into the runtime and the output array's
    allocation, whose cost depends on what else the process did and holds, so one model's count must not depend on
    the others or on where the file lies. Each count covers `runs` inferences after `warmup` ones (first-run
    allocations and one-time weight packing excluded); the same model, input, CPU and environment give the same
    number on any host."""
    import numpy as np

    plugin(env)  # built once, before the processes start
    for cpu in cpus:
        cpu_view(env, cpu)
    with tempfile.TemporaryDirectory(prefix="edgekd-arm-count-") as tmp:
        inputs = Path(tmp) / "x1.npy"
        np.save(inputs, np.ascontiguousarray(x1, dtype=np.float32))
        pairs = [(str(path), runtime, cpu) for path, runtime in models for cpu in cpus]

        def task(k: int, path: str, runtime: str, cpu: str) -> Callable[[], dict]:
            model = f"model{Path(path).suffix}"
            spec = {"mode": "count", "input_npy": f"{GUEST_IO}/x1.npy", "warmup": warmup, "runs": runs,
                    "jobs": [{"path": f"{GUEST_IO}/{model}", "runtime": runtime}]}
            files = {"x1.npy": inputs, model: Path(path)}
            return lambda: _run_in_sandbox(env, cpu, spec, files, Path(tmp) / f"run_{k}", count=True)

        results = _parallel([task(k, *p) for k, p in enumerate(pairs)], workers or os.cpu_count() or 1)
    out: dict[str, dict[str, int]] = {}
    for (path, _, cpu), r in zip(pairs, results):
        if 0 not in r.get("instructions", {}):
            raise EdgekdError(f"aarch64 runner ({cpu}): no instruction count for {Path(path).name} "
                              f"(the counting plugin saw no marker)")
        out.setdefault(path, {})[cpu] = round(r["instructions"][0] / runs)
    return out


def describe(env: Aarch64Env, cpu: str) -> dict:
    """Where a figure computed in this environment came from, for report.json."""
    info = json.loads((env.path / "edgekd-env.json").read_text())
    return {"architecture": "aarch64", "emulated_cpu": cpu, "cpu_description": CPUS[cpu][2],
            "emulator": f"qemu-user {info.get('qemu', '?')} (TCG)", "python": env.versions.get("python"),
            "debian": DEBIAN_SUITE}
