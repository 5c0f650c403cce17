"""Render the report object: report.json (the contract) and report.md (a table for a pull request)."""

from __future__ import annotations

from pathlib import Path

from edgekd.pipeline.store import atomic_write_json, atomic_write_text


def write_reports(report: dict, run_dir: Path) -> dict[str, Path]:
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], to_markdown(report))
    return paths


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _size(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def to_markdown(r: dict) -> str:
    gate = r.get("gate", {})
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    t = r.get("teacher", {})
    lines = [
        f"# edgekd report: {r.get('pipeline')} -> {r.get('target')}",
        "",
        f"**Gate: {verdict}**" + (f" - best artifact: `{gate.get('best_artifact')}`" if gate.get("best_artifact") else ""),
        "",
        f"Teacher `{t.get('arch')}`: {t.get('params', 0):,} params, test accuracy {_pct(t.get('accuracy'))}"
        f" ({'trained in this build' if t.get('trained_here') else 'loaded from ' + str(t.get('checkpoint'))});"
        f" fp32 ONNX p50 {_ms((t.get('latency_ms') or {}).get('p50'))} ms.",
        f"Student `{r.get('student', {}).get('arch')}`: {r.get('student', {}).get('params', 0):,} params.",
        "",
        "| artifact | runtime | accuracy | drop vs teacher | agreement | p50 ms | p90 ms | p99 ms | load ms | peak RSS | size |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in r.get("artifacts", []):
        lat = a.get("latency_ms") or {}
        drop = None if a.get("accuracy") is None or t.get("accuracy") is None else t["accuracy"] - a["accuracy"]
        lines.append(f"| `{a['name']}` | {a.get('runtime')} | {_pct(a.get('accuracy'))} | "
                     f"{'n/a' if drop is None else f'{100 * drop:+.2f} pt'} | {_pct(a.get('teacher_agreement'))} | "
                     f"{_ms(lat.get('p50'))} | {_ms(lat.get('p90'))} | {_ms(lat.get('p99'))} | {_ms(a.get('load_ms'))} | "
                     f"{_size(a.get('peak_rss_bytes'))} | {_size(a.get('size_bytes'))} |")
    for name in r.get("missing_artifacts", []):
        lines.append(f"| `{name}` | MISSING | | | | | | | | | |")
    lines += ["", f"Latency: {r.get('benchmark', {}).get('measured_on')}, batch {r.get('benchmark', {}).get('batch_size')}.",
              "These are host measurements, not the target device's latency.", "",
              "## Gate checks", "", "| check | value | limit | result |", "|---|---:|---:|---|"]
    for c in gate.get("checks", []):
        value = "n/a" if c.get("value") is None else f"{c['value']:.4g}"
        lines.append(f"| {c['name']} | {value} | {c['limit']:.4g} | {'pass' if c['passed'] else '**FAIL**'} |")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---:|"]
    for s in r.get("stages", []):
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} |")
    ds = r.get("dataset", {})
    lines += ["", f"Dataset `{ds.get('name')}`: train {ds.get('train')}, val {ds.get('val')}, test {ds.get('test')}; "
              f"fingerprint `{str(ds.get('fingerprint'))[:12]}`. Config hash `{str(r.get('config_hash'))[:12]}`, "
              f"seed {r.get('seed')}. edgekd {r.get('versions', {}).get('edgekd')}.", ""]
    return "\n".join(lines)
