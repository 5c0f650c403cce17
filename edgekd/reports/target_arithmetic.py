"""The report's target-arithmetic section: each artifact's accuracy from the host's kernels and from the target's
(aarch64 runtimes under emulation) side by side, and the emulated instruction counts per CPU.

Instruction counts are labelled as what they are (emulated aarch64 instructions per inference), never as a time.
"""

from __future__ import annotations

from html import escape

from edgekd.reports.checks import format_value


def _rows(r: dict) -> list[dict]:
    t = r.get("teacher") or {}
    rows = [{"name": a["name"], "runtime": a.get("runtime"), "host": a.get("host_accuracy"),
             "target": a.get("accuracy") if (a.get("accuracy_measured_on") or {}).get("architecture") == "aarch64"
             else None, "diff": a.get("host_target_top1_disagreements"),
             "counts": {c["cpu"]: c["per_inference"] for c in a.get("arm_instructions") or []}}
            for a in r.get("artifacts") or []]
    if t.get("arm_instructions"):
        rows.append({"name": "teacher_fp32.onnx", "runtime": "onnxruntime", "host": None, "target": None, "diff": None,
                     "counts": {c["cpu"]: c["per_inference"] for c in t["arm_instructions"]}})
    return rows


def _heading(r: dict) -> tuple[str, list[str]]:
    ta, arm = r.get("target_arithmetic") or {}, r.get("arm_instructions") or {}
    cpus = list(arm.get("cpus") or [])
    bits = []
    if ta:
        bits.append(f"Accuracy with the target's arithmetic: the aarch64 runtimes on an emulated {ta.get('emulated_cpu')} "
                    f"({ta.get('emulator')}), {ta.get('samples')} of {ta.get('of')} test images"
                    + (f" (a fixed subset, seed {ta['subset_seed']})" if ta.get("subset_seed") is not None else "")
                    + "; the gate reads these. Host: this build host's x86 kernels, for comparison.")
    if cpus:
        bits.append(f"Instruction counts: {arm.get('label')}.")
    return " ".join(bits), cpus


def target_lines(r: dict) -> list[str]:
    """Markdown for report.md; empty when the target names no ARM CPU to emulate."""
    text, cpus = _heading(r)
    if not text:
        return []
    lines = ["", "## Target arithmetic (aarch64)", "", text, "",
             "| artifact | runtime | host accuracy | aarch64 accuracy | top-1 differs | "
             + " | ".join(f"instructions / inference ({c})" for c in cpus) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(cpus)]
    for row in _rows(r):
        lines.append(f"| `{row['name']}` | {row['runtime']} | {format_value(row['host'], 'percent')} | "
                     f"{format_value(row['target'], 'percent')} | {'' if row['diff'] is None else row['diff']} | "
                     + " | ".join(f"{row['counts'][c]:,}" if c in row["counts"] else "n/a" for c in cpus) + " |")
    return lines


def target_html(r: dict) -> str:
    """The same section for report.html ("" when there is nothing to show)."""
    text, cpus = _heading(r)
    if not text:
        return ""
    head = ("<tr><th>artifact</th><th>runtime</th><th>host accuracy</th><th>aarch64 accuracy</th><th>top-1 differs</th>"
            + "".join(f"<th>instructions / inference ({escape(c)})</th>" for c in cpus) + "</tr>")
    body = "".join(
        f"<tr><td><code>{escape(row['name'])}</code></td><td>{escape(str(row['runtime']))}</td>"
        f"<td class=n>{format_value(row['host'], 'percent')}</td><td class=n>{format_value(row['target'], 'percent')}</td>"
        f"<td class=n>{'' if row['diff'] is None else row['diff']}</td>"
        + "".join(f"<td class=n>{row['counts'][c]:,}</td>" if c in row["counts"] else "<td class=n>n/a</td>"
                  for c in cpus) + "</tr>" for row in _rows(r))
    return f'<h2>Target arithmetic (aarch64)</h2><p class="sub">{escape(text)}</p><table>{head}{body}</table>'
