"""Render the report object: report.json (the contract), report.md (a pull-request comment), report.html
(a self-contained page with plots) and report.junit.xml (one test case per gate check, for CI)."""

from __future__ import annotations

import json
from pathlib import Path

from edgekd.pipeline.store import atomic_write_text
from edgekd.reports.accelerator import accelerator_lines
from edgekd.reports.checks import explain, format_bytes, format_limit, format_ms, format_value
from edgekd.reports.html import to_html
from edgekd.reports.junit import to_junit
from edgekd.reports.notes import artifact_notes
from edgekd.reports.target_arithmetic import target_lines

FILES = {"json": "report.json", "md": "report.md", "html": "report.html", "junit": "report.junit.xml"}


def render(report: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2, default=str) + "\n"
    return {"md": to_markdown, "html": to_html, "junit": to_junit}[fmt](report)


def write_reports(report: dict, run_dir: Path) -> dict[str, Path]:
    """Every format next to each other in the run directory; report.json last, so its presence means complete."""
    paths = {fmt: run_dir / name for fmt, name in FILES.items()}
    for fmt in ("md", "html", "junit", "json"):
        atomic_write_text(paths[fmt], render(report, fmt))
    return paths


def _pct(v) -> str:
    return format_value(v, "percent")




def _distillation_lines(r: dict) -> list[str]:
    """The teachers of an ensemble, the assistant of a chain, and the distillation methods with their weights."""
    t, lines = r.get("teacher", {}), []
    for m in t.get("members") or []:
        lines.append(f"- teacher `{m['name']}` (`{m['arch']}`, weight {m['weight']:g}): {m['params']:,} params, "
                     f"test accuracy {_pct(m.get('test_accuracy_torch'))} (torch)")
    if t.get("members"):
        lines.append(f"- ensemble of {len(t['members'])} teachers: test accuracy "
                     f"{_pct((t.get('ensemble') or {}).get('test_accuracy_torch'))} (torch)")
    a = r.get("assistant")
    if a:
        lines.append(f"- teacher assistant `{a.get('arch')}`: {a.get('params') or 0:,} params, test accuracy "
                     f"{_pct(a.get('test_accuracy_torch'))} (torch); the student was distilled from it")
    d = (r.get("student") or {}).get("distill") or {}
    if d.get("methods"):
        methods = ", ".join(f"{name} ×{m.get('weight', 1):g}" for name, m in d["methods"].items())
        lines.append(f"- distillation: {methods} (alpha {d.get('alpha')}, T {d.get('temperature')}); teacher output "
                     f"cache {'on' if d.get('teacher_output_cache') else 'off'}"
                     + (f"; trained data-parallel on {d['train_processes']} processes"
                        if (d.get("train_processes") or 1) > 1 else ""))
    bn = d.get("batchnorm_recalibration")
    if bn:
        lines.append(f"- BatchNorm statistics re-estimated on {bn['images']} training images after distillation: "
                     f"validation accuracy {_pct(bn['val_accuracy_running'])} with the running statistics, "
                     f"{_pct(bn['val_accuracy_recalibrated'])} re-estimated; "
                     + ("the re-estimate was kept" if bn["kept"] else "the running statistics were kept"))
    return [""] + lines if lines else []


def _compression_lines(r: dict) -> list[str]:
    """Pruning (params, MACs, accuracy before/after recovery) and QAT vs post-training int8 accuracy."""
    c, lines = r.get("compression") or {}, []
    p = c.get("prune")
    if p:
        lines.append(f"- pruning ({p['ratio']:.0%} of the channels, classifier kept): params {p['params_before']:,} -> "
                     f"{p['params_after']:,} ({p['params_ratio']:.0%}), MACs {p['macs_before']:,} -> "
                     f"{p['macs_after']:,} ({p['macs_ratio']:.0%}); test accuracy {_pct(p['test_accuracy_before'])} -> "
                     f"{_pct(p['test_accuracy_after_pruning'])} pruned -> {_pct(p['test_accuracy_after_recovery'])} "
                     f"after {p['recovery']['epochs']} epochs of KD recovery (torch)")
    q = c.get("qat")
    if q:
        acc = c.get("int8_accuracy", {})
        both = {**acc.get("post_training", {}), **acc.get("qat", {})}
        lines.append(f"- QAT ({q['epochs']} epochs, KD on; {q['scheme']['activation_type']} activations, "
                     f"{q['scheme']['weights']} weights): int8 test accuracy "
                     + ", ".join(f"`{n}` {_pct(v)}" for n, v in both.items()))
    return [""] + lines if lines else []


def to_markdown(r: dict) -> str:
    gate = r.get("gate", {})
    checks = gate.get("checks", [])
    failed = [c for c in checks if not c.get("passed")]
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    t = r.get("teacher", {})
    lines = [
        f"# edgekd report: {r.get('pipeline')} -> {r.get('target')}",
        "",
        f"**Gate: {verdict}** ({len(checks) - len(failed)} of {len(checks)} checks pass)"
        + (f" - best artifact: `{gate.get('best_artifact')}`" if gate.get("best_artifact") else ""),
        "",
    ]
    if failed:
        lines += ["Failing checks:", ""] + [f"- {explain(c)}" for c in failed] + [""]
    for w in (gate.get("regression") or {}).get("warnings", []):
        lines.append(f"> warning: {w}")
    lines += [
        f"Teacher `{t.get('arch')}`: {t.get('params') or 0:,} params, test accuracy {_pct(t.get('accuracy'))}"
        f" ({'trained in this build' if t.get('trained_here') else 'loaded from ' + str(t.get('checkpoint'))});"
        f" fp32 ONNX p50 {format_ms((t.get('latency_ms') or {}).get('p50'))} ms.",
        f"Student `{r.get('student', {}).get('arch')}`: {r.get('student', {}).get('params') or 0:,} params.",
        *_distillation_lines(r),
        *_compression_lines(r),
        "",
        "| artifact | runtime | accuracy | drop vs teacher | agreement | p50 ms | p90 ms | p99 ms | load ms | peak RSS | size |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in r.get("artifacts", []):
        lat = a.get("latency_ms") or {}
        drop = None if a.get("accuracy") is None or t.get("accuracy") is None else t["accuracy"] - a["accuracy"]
        lines.append(f"| `{a['name']}` | {a.get('runtime')} | {_pct(a.get('accuracy'))} | "
                     f"{'n/a' if drop is None else f'{100 * drop:+.2f} pt'} | {_pct(a.get('teacher_agreement'))} | "
                     f"{format_ms(lat.get('p50'))} | {format_ms(lat.get('p90'))} | {format_ms(lat.get('p99'))} | {format_ms(a.get('load_ms'))} | "
                     f"{format_bytes(a.get('peak_rss_bytes'))} | {format_bytes(a.get('size_bytes'))} |")
    for name in r.get("missing_artifacts", []):
        lines.append(f"| `{name}` | MISSING | | | | | | | | | |")
    notes = artifact_notes(r)
    if notes:
        lines += ["", "Artifact notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", f"Latency: {r.get('benchmark', {}).get('measured_on')}, batch {r.get('benchmark', {}).get('batch_size')}.",
              "These are host measurements, not the target device's latency."]
    lines += target_lines(r)
    lines += accelerator_lines(r)
    lines += ["", "## Gate checks", "", "| check | value | limit | result |", "|---|---:|---:|---|"]
    for c in checks:
        lines.append(f"| {c['name']} | {format_value(c.get('value'), c.get('unit'))} | {format_limit(c)} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} |")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---:|"]
    for s in r.get("stages", []):
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} |")
    ds = r.get("dataset", {})
    lines += ["", f"Dataset `{ds.get('name')}`: train {ds.get('train')}, val {ds.get('val')}, test {ds.get('test')}; "
              f"fingerprint `{str(ds.get('fingerprint'))[:12]}`. Config hash `{str(r.get('config_hash'))[:12]}`, "
              f"seed {r.get('seed')}. edgekd {r.get('versions', {}).get('edgekd')}.", ""]
    return "\n".join(lines)
