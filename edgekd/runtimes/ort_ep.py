"""onnxruntime sessions on an execution provider, and where their nodes really ran.

Imports only numpy and onnxruntime (+ the EP's own package), so it runs in any runtime environment.

Never trust `session.get_providers()`: it lists what was *asked for*. With the PyPI wheels, asking for NNAPI or
CoreML only warns and runs everything on CPU, and passing `providers=[("QNNExecutionProvider", ...)]` with the
onnxruntime-qnn plugin silently ran on CPU too. Placement is read from what onnxruntime itself recorded:

- the profile (SessionOptions.enable_profiling): every executed kernel is an event with cat "Node" and
  args.provider; a whole EP partition shows up as one fused kernel;
- the graph-assignment record (session config `session.record_ep_graph_assignment_info`, onnxruntime >= 1.24):
  every node of the final graph with the provider it was assigned to, so fused partitions count node by node.
"""

from __future__ import annotations

import json
from collections import Counter

# EPs shipped as plugin libraries: (python module, function giving the library path). They are registered with
# register_execution_provider_library and added with add_provider_for_devices (the recipe verified in STACK.md).
PLUGIN_EPS = {"QNNExecutionProvider": "onnxruntime_qnn"}
_registered: set[str] = set()


def _plugin_devices(ort, ep_name: str):
    import importlib

    module = importlib.import_module(PLUGIN_EPS[ep_name])
    if ep_name not in _registered:
        ort.register_execution_provider_library(ep_name, module.get_library_path())
        _registered.add(ep_name)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == ep_name]
    if not devices:
        raise RuntimeError(f"{ep_name}: the library registered but offers no device")
    return module, devices


def make_session(path: str, threads: int = 1, ep_name: str | None = None, options: dict | None = None,
                 profile_prefix: str | None = None, context_path: str | None = None,
                 legacy_providers: bool = False):
    """An InferenceSession on `ep_name` (CPU if None).

    context_path: also write the EP's precompiled EPContext model there (ep.context_enable, embedded binary).
    legacy_providers: ask for the EP the old way, `providers=[(ep_name, options), "CPUExecutionProvider"]`
    (used to show that this silently falls back to CPU)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if hasattr(ort.InferenceSession, "get_provider_graph_assignment_info"):
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if context_path:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_path))
        so.add_session_config_entry("ep.context_embed_mode", "1")
    options = {str(k): str(v) for k, v in (options or {}).items()}
    if not ep_name or ep_name == "CPUExecutionProvider":
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    if legacy_providers or ep_name not in PLUGIN_EPS:
        return ort.InferenceSession(str(path), so, providers=[(ep_name, options), "CPUExecutionProvider"])
    module, devices = _plugin_devices(ort, ep_name)
    if ep_name == "QNNExecutionProvider" and "backend_path" not in options and "backend_type" not in options:
        options["backend_path"] = module.get_qnn_htp_path()
    so.add_provider_for_devices(devices, options)
    return ort.InferenceSession(str(path), so)


def profile_kernels(profile_file: str) -> dict[str, tuple[str, str]]:
    """Executed kernels from an onnxruntime profile: node name -> (provider, op type)."""
    with open(profile_file) as f:
        events = json.load(f)
    kernels = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            args = e.get("args", {})
            kernels[name[: -len("_kernel_time")]] = (args.get("provider", "?"), args.get("op_name", "?"))
    return kernels


def placement(session, profile_file: str, ep_name: str) -> dict:
    """How many nodes (and which op types) ran on `ep_name` and how many on the CPU."""
    kernels = profile_kernels(profile_file)
    executed = Counter(p for p, _ in kernels.values())
    out = {"provider": ep_name, "providers_claimed_by_session": list(session.get_providers()),
           "profile": {"kernels_executed": dict(executed),
                       "partitions_on_provider": executed.get(ep_name, 0),
                       "cpu_kernels": sorted({op for p, op in kernels.values() if p == "CPUExecutionProvider"})}}
    assigned = None
    if hasattr(session, "get_provider_graph_assignment_info"):
        try:
            assigned = [(sg.ep_name, [(n.name, n.op_type) for n in sg.get_nodes()])
                        for sg in session.get_provider_graph_assignment_info()]
        except Exception:  # noqa: BLE001 - older builds: fall back to the profile
            assigned = None
    if assigned:
        on_ep = [(n, op) for ep, nodes in assigned if ep == ep_name for n, op in nodes]
        off_ep = [(ep, n, op) for ep, nodes in assigned if ep != ep_name for n, op in nodes]
        out["source"] = "onnxruntime graph-assignment record (node level) + profile (executed kernels)"
        out["partitions"] = sum(1 for ep, _ in assigned if ep == ep_name)
    else:
        # Node-level record unavailable: count executed kernels, a whole EP partition counting as one node.
        on_ep = [(n, op) for n, (p, op) in kernels.items() if p == ep_name]
        off_ep = [(p, n, op) for n, (p, op) in kernels.items() if p != ep_name]
        out["source"] = "onnxruntime profile (executed kernels; an EP partition counts as one)"
        out["partitions"] = len(on_ep)
    total = len(on_ep) + len(off_ep)
    out.update({
        "nodes_total": total, "nodes_on_provider": len(on_ep), "nodes_elsewhere": len(off_ep),
        "fraction_on_provider": (len(on_ep) / total) if total else 0.0,
        "ops_on_provider": dict(Counter(op for _, op in on_ep)),
        "ops_elsewhere": dict(Counter(op for _, _, op in off_ep)),
        "nodes_elsewhere_list": [{"name": n, "op": op, "provider": p} for p, n, op in off_ep[:100]],
    })
    return out
