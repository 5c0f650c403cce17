"""The report's execution-provider section (placement, accuracy through the EP, EPContext) and device runner."""

from __future__ import annotations


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def accelerator_lines(r: dict) -> list[str]:
    """Markdown lines for report.md; empty for a CPU-only target without a device runner result."""
    accel, lines = r.get("accelerator") or {}, []
    arts = [a for a in r.get("artifacts", []) if a.get("accelerator")]
    if accel:
        ep = accel.get("execution_provider")
        env = accel.get("runtime_env") or {}
        lines += ["", f"## Execution provider: {ep}", "",
                  f"Placement check: {accel.get('placement_check')}"
                  + (f"; SoC {accel['soc']}" if accel.get("soc") else "")
                  + (f"; runtime environment `{env.get('name')}` (onnxruntime {(env.get('versions') or {}).get('onnxruntime')}"
                     f", onnxruntime-qnn {(env.get('versions') or {}).get('onnxruntime-qnn')})" if env else "")
                  + (f"; static batch {accel['static_batch_size']}" if accel.get("static_batch_size") else "") + ".",
                  "", "| artifact | nodes on EP | partitions | not on EP | accuracy via EP | agreement with CPU EP "
                      "| EP p50 ms | precompiled (EPContext) |",
                  "|---|---:|---:|---|---:|---:|---:|---|"]
        for a in arts:
            e, p = a["accelerator"], a["accelerator"].get("placement") or {}
            off = ", ".join(f"{op} x{n}" for op, n in sorted((p.get("ops_elsewhere") or {}).items())) or "none"
            lat = (e.get("latency_ms") or {}).get("p50")
            ctx = e.get("context_model") or {}
            lines.append(f"| `{a['name']}` | {p.get('nodes_on_provider')}/{p.get('nodes_total')} "
                         f"({_pct(p.get('fraction_on_provider'))}) | {p.get('partitions')} | {off} | "
                         f"{_pct(e.get('accuracy'))} | {_pct(e.get('agreement_with_cpu_ep'))} | "
                         f"{'n/a' if lat is None else f'{lat:.4g}'} | {ctx.get('file', 'n/a')} |")
        caveats = sorted({c for a in arts for c in (a["accelerator"].get("placement") or {}).get("unchecked_caveats", [])})
        if caveats:
            lines += ["", "Not checked by the usability checker (per-op conditions to verify on a device): "
                      + "; ".join(c.rstrip(".") for c in caveats) + "."]
        lines += ["", f"Latency through the EP: {accel.get('latency_note')}.",
                  "Placement source: " + "; ".join(sorted({(a['accelerator'].get('placement') or {}).get('source', '?')
                                                          for a in arts})) + "."]
    dev = r.get("device_runner") or {}
    if dev:
        lines += ["", f"Device runner (adb): {dev.get('message')}."]
        for name, res in (dev.get("results") or {}).items():
            lat = res.get("latency_ms") or {}
            lines.append(f"- `{name}`: {res.get('status')}" + (f", p50 {lat.get('p50')} ms, mean {lat.get('mean')} ms "
                                                            f"({res.get('measured_on')})" if lat else
                                                            f" ({res.get('message')})" if res.get("message") else ""))
    return lines
