"""The accelerator part of a benchmark: each EP artifact's placement, accuracy through the EP, EPContext model.

For a profile with an execution provider (devices/android-npu-qnn.yaml, android-nnapi.yaml, ios-coreml.yaml):

1. a static-shape copy of each artifact the EP takes (the profile's static_batch_size);
2. placement_check `session` (QNN): the copy runs in the profile's runtime environment (created on demand,
   edgekd/runtimes/envs.py) in a fresh process (edgekd/runtimes/bench_worker.py): compile through the EP (QNN: the
   HTP simulator), run the test split through it, read where every node ran from onnxruntime's own records
   (edgekd/runtimes/ort_ep.py), write the precompiled EPContext model, time it. Accuracy and agreement with the
   CPU EP are computed here from the logits the worker saved.
   placement_check `mobile-usability` (NNAPI, CoreML): onnxruntime's mobile usability checker on the copy
   (edgekd/runtimes/mobile_usability.py); latency only on a real device.

Latency through the QNN HTP *simulator* is kept, labelled as simulator time: it is not a device latency.
"""

from __future__ import annotations

import json
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from edgekd.errors import StageError
from edgekd.export.static_shape import make_static_copy
from edgekd.runtimes.envs import ensure_env, worker_env

SHORT = {"QNNExecutionProvider": "qnn", "NnapiExecutionProvider": "nnapi", "CoreMLExecutionProvider": "coreml"}


def run_worker_in(python: str, spec: dict, env: dict | None = None, timeout: float = 1800,
                  stage: str = "benchmark") -> dict:
    """One measurement by edgekd.runtimes.bench_worker under `python` (any runtime environment)."""
    try:
        proc = subprocess.run([python, "-m", "edgekd.runtimes.bench_worker", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise StageError(stage, f"measuring {Path(spec['path']).name} timed out after {timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        raise StageError(stage, f"measuring {Path(spec['path']).name} failed (exit {proc.returncode}): {tail[-1]}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise StageError(stage, f"measuring {Path(spec['path']).name} on {spec.get('ep', {}).get('name', 'CPU')} "
                                f"failed: {result['error']}")
    return result


def latency_label(profile, env_info: dict) -> str:
    ep = profile.execution_provider
    if ep == "QNNExecutionProvider":
        version = (env_info.get("versions") or {}).get("onnxruntime-qnn", "?")
        return (f"QNN HTP simulator (onnxruntime-qnn {version}, soc_model {profile.provider_options.get('soc_model')}) "
                f"on the {platform.machine()} build host: simulator time, NOT a device latency")
    return f"{ep}: not measured here (latency only on a real device)"


def measure_accelerator(profile, artifacts: list[tuple[str, Path]], out_dir: Path, x_test: np.ndarray,
                        y_test: np.ndarray, warmup: int, runs: int, threads: int,
                        log: Callable[[str], None]) -> dict:
    """Placement (and, where the EP runs here, accuracy, EPContext and simulator latency) per EP artifact.
    Files go under out_dir/accelerator/."""
    ep, check = profile.execution_provider, profile.effective_placement_check
    short = SHORT.get(ep, ep)
    folder = out_dir / "accelerator"
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"execution_provider": ep, "placement_check": check, "soc": profile.soc or None,
               "provider_options": dict(profile.provider_options), "runtime_env": None,
               "min_node_fraction": profile.min_accelerator_node_fraction,
               "static_batch_size": profile.static_batch_size if profile.static_shapes else None, "artifacts": {}}
    env_info = None
    if check == "session":
        env_info = ensure_env(profile.runtime_env, log)
        summary["runtime_env"] = {k: env_info.get(k) for k in ("name", "path", "created", "seconds")}
        summary["runtime_env"]["versions"] = {d: (env_info.get("versions") or {}).get(d)
                                              for d in ("onnxruntime", "onnxruntime-qnn", "numpy")}
        if env_info.get("created"):
            log(f"runtime environment {env_info['name']} created in {env_info['seconds']:.0f} s")
    summary["latency_note"] = latency_label(profile, env_info or {})
    for name, path in artifacts:
        stem = Path(name).stem
        model = path
        record: dict = {"source_artifact": name}
        if profile.static_shapes:
            model = folder / f"{stem}.static.onnx"
            record["static_model"] = {"file": f"accelerator/{model.name}",
                                      **make_static_copy(path, model, profile.static_batch_size)}
        if check == "mobile-usability":
            from edgekd.runtimes.mobile_usability import mobile_placement

            record["placement"] = mobile_placement(model, profile.mobile_checker)
            record["latency"] = "not measured here: latency only on a real device (device runner)"
        else:
            record.update(_run_session(profile, env_info, path, model, folder, f"{stem}.{short}_ctx.onnx",
                                       x_test, y_test, warmup, runs, threads))
            record["latency_label"] = summary["latency_note"]
        p = record["placement"]
        record["placement"]["min_fraction"] = profile.min_accelerator_node_fraction
        elsewhere = ", ".join(f"{op} x{n}" for op, n in sorted(p["ops_elsewhere"].items())) or "none"
        acc = f"; accuracy through {short} {record['accuracy']:.4f} on {record['samples']} test images" \
            if record.get("accuracy") is not None else ""
        log(f"{name:22s} {ep}: {p['nodes_on_provider']}/{p['nodes_total']} nodes on the provider "
            f"({100 * p['fraction_on_provider']:.1f}%), {p['partitions']} partition(s); elsewhere: {elsewhere}{acc}")
        summary["artifacts"][name] = record
    return summary


def _run_session(profile, env_info: dict, original: Path, model: Path, folder: Path, ctx_name: str,
                 x_test: np.ndarray, y_test: np.ndarray, warmup: int, runs: int, threads: int) -> dict:
    batch = profile.static_batch_size if profile.static_shapes else 1
    (folder / ctx_name).unlink(missing_ok=True)  # onnxruntime refuses to overwrite an EPContext model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "input.npy", np.ascontiguousarray(x_test[:batch], dtype=np.float32))
        np.save(tmp / "eval.npy", np.ascontiguousarray(x_test, dtype=np.float32))
        spec = {"path": str(model), "runtime": "onnxruntime", "threads": threads, "warmup": warmup, "runs": runs,
                "input_npy": str(tmp / "input.npy"), "eval_npy": str(tmp / "eval.npy"),
                "eval_out_npy": str(tmp / "eval_logits.npy"), "work_dir": str(tmp),
                "ep": {"name": profile.execution_provider, "options": dict(profile.provider_options)},
                "context_out": str(folder / ctx_name)}
        r = run_worker_in(env_info["python"], spec, env=worker_env())
        logits = np.load(tmp / "eval_logits.npy")
    cpu = _cpu_logits(original, x_test)  # the same model on edgekd's own CPU EP
    pred = logits.argmax(1)
    record = {
        "accuracy": float((pred == y_test).mean()), "samples": int(len(y_test)),
        "agreement_with_cpu_ep": float((pred == cpu.argmax(1)).mean()),
        "max_abs_logit_diff_vs_cpu_ep": float(np.abs(logits - cpu).max()),
        "placement": r["placement"], "load_ms": r["load_ms"], "first_ms": r["first_ms"],
        "latency_ms": r["latency_ms"], "runs": r["runs"], "peak_rss_bytes": r["peak_rss_bytes"],
        "onnxruntime": r.get("onnxruntime"), "ep_package": r.get("ep_package"), "eval_seconds": r["eval"]["seconds"],
    }
    if r.get("context_model"):
        record["context_model"] = {**r["context_model"], "file": f"accelerator/{ctx_name}"}
    return record


def _cpu_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits on onnxruntime's CPU EP (edgekd's own), for a dynamic- or fixed-batch model."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else 256
    outs = []
    for i in range(0, len(x), batch):
        chunk = np.ascontiguousarray(x[i:i + batch], dtype=np.float32)
        n = len(chunk)
        if n < batch and isinstance(inp.shape[0], int):
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
        outs.append(session.run(None, {inp.name: chunk})[0][:n])
    return np.concatenate(outs).astype(np.float32)
