"""report.html: one self-contained page (inline CSS and SVG; no script, no external file, no network).

Top to bottom, in the order a release manager reads: the verdict and what failed, the four plots (accuracy
against latency, sizes, latency distributions, stage times), the artifact table, every gate check, and what
is needed to reproduce the decision (versions, host, config and its hash, dataset fingerprint, seeds).
"""

from __future__ import annotations

import json
from html import escape

from edgekd.reports import svg
from edgekd.reports.checks import explain, format_bytes, format_limit, format_ms, format_value
from edgekd.reports.notes import artifact_notes
from edgekd.reports.target_arithmetic import target_html

STAGE_COLORS = {"ran": "#0f766e", "cached": "#9ca3af", "failed": "#b91c1c"}

CSS = """
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; color: #111827; background: #f3f4f6;
       margin: 0; }
main { max-width: 1160px; margin: 0 auto; padding: 20px; }
h1 { font-size: 22px; margin: 0 0 4px 0; } h2 { font-size: 17px; margin: 28px 0 10px 0; }
.sub { color: #6b7280; font-size: 13px; }
.verdict { border-radius: 8px; padding: 14px 18px; margin: 16px 0; color: #ffffff; font-size: 18px; }
.verdict.pass { background: #15803d; } .verdict.fail { background: #b91c1c; }
.verdict small { display: block; font-size: 13px; opacity: 0.95; margin-top: 4px; }
.box { background: #ffffff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 12px 16px; margin: 12px 0; }
.box.warn { border-color: #f59e0b; background: #fffbeb; }
.box ul { margin: 4px 0; padding-left: 20px; }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 12px; }
.plots figure { margin: 0; background: #ffffff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 6px; }
.plots svg { width: 100%; height: auto; display: block; }
.plots .empty { color: #6b7280; padding: 40px 16px; }
table { border-collapse: collapse; width: 100%; background: #ffffff; font-size: 13px; }
th, td { border: 1px solid #e5e7eb; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f9fafb; } td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.fail td { background: #fef2f2; } .tag { font-weight: bold; } .tag.pass { color: #15803d; }
.tag.fail { color: #b91c1c; } code { font-size: 12px; } .swatch { display: inline-block; width: 10px;
height: 10px; border-radius: 2px; margin-right: 6px; } pre { white-space: pre-wrap; font-size: 12px; }
"""


def to_html(r: dict) -> str:
    gate = r.get("gate") or {}
    checks = gate.get("checks") or []
    failed = [c for c in checks if not c.get("passed")]
    passed = bool(gate.get("passed"))
    best = gate.get("best_artifact")
    colors = artifact_colors(r)
    title = f"edgekd report: {r.get('pipeline')} → {r.get('target')}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)} — {'PASSED' if passed else 'FAILED'}</title>", f"<style>{CSS}</style>",
        "</head><body><main>",
        f"<h1>{escape(title)}</h1>",
        f'<div class="sub">built {escape(str(r.get("created_at") or "?"))} with edgekd '
        f'{escape(str((r.get("versions") or {}).get("edgekd")))}; config <code>{escape(str(r.get("config_hash"))[:12])}'
        f"</code></div>",
        f'<div class="verdict {"pass" if passed else "fail"}">Gate {"PASSED" if passed else "FAILED"}'
        f" — {len(checks) - len(failed)} of {len(checks)} checks pass"
        f"<small>{_best_label(checks, best)}{_best_summary(r, best)}</small></div>",
    ]
    if gate.get("budget_source"):
        parts.append(f'<div class="box warn">Re-evaluated against the budget in '
                     f"<code>{escape(gate['budget_source'])}</code>, not the one this build was made with.</div>")
    if failed:
        parts.append('<div class="box"><b>Failing checks</b><ul>'
                     + "".join(f"<li>{escape(explain(c))}</li>" for c in failed) + "</ul></div>")
    regression = gate.get("regression")
    if regression:
        base = regression.get("baseline") or {}
        parts.append(f'<div class="box">Compared with the baseline built {escape(str(base.get("created_at")))} '
                     f"(config <code>{escape(str(base.get('config_hash'))[:12])}</code>, edgekd "
                     f"{escape(str(base.get('edgekd')))}): regressions "
                     f"{'none' if regression.get('passed') else 'found'}.</div>")
        if regression.get("warnings"):
            parts.append('<div class="box warn"><b>Comparison caveats</b><ul>'
                         + "".join(f"<li>{escape(w)}</li>" for w in regression["warnings"]) + "</ul></div>")
    if r.get("missing_artifacts"):
        parts.append('<div class="box warn">Missing artifacts: '
                     + ", ".join(f"<code>{escape(n)}</code>" for n in r["missing_artifacts"]) + "</div>")
    parts += ["<h2>Plots</h2>", '<div class="plots">',
              _figure(accuracy_latency_plot(r, colors)), _figure(size_plot(r, colors)),
              _figure(latency_distribution_plot(r, colors)), _figure(stage_time_plot(r)), "</div>",
              f'<p class="sub">{escape(_measured_note(r))}</p>',
              "<h2>Artifacts</h2>", _artifact_table(r, colors), _notes_html(r), target_html(r),
              "<h2>Gate checks</h2>", _checks_table(checks),
              "<h2>Reproduce this decision</h2>", _reproduce(r),
              "</main></body></html>"]
    return "\n".join(parts) + "\n"


def artifact_colors(r: dict) -> dict[str, str]:
    """One colour per artifact across every plot and table; the teacher is always red."""
    colors = {a["name"]: svg.color_for(i) for i, a in enumerate(r.get("artifacts") or [])}
    colors["teacher"] = svg.TEACHER_COLOR
    return colors


def _budget(r: dict) -> dict:
    return (r.get("config") or {}).get("budget") or {}


def accuracy_latency_plot(r: dict, colors: dict) -> str | None:
    t = r.get("teacher") or {}
    points = []
    for label, entry, color, shape in ([(f"teacher ({t.get('arch')}, fp32 ONNX)", t, colors["teacher"], "diamond")]
                                       + [(a["name"], a, colors[a["name"]], "circle") for a in r.get("artifacts") or []]):
        lat = entry.get("latency_ms") or {}
        acc = entry.get("accuracy")
        points.append({"label": label, "x": lat.get("p50"), "y": None if acc is None else 100 * acc,
                       "x_range": (lat["p50"], lat["p90"]) if lat.get("p90") else None, "color": color,
                       "shape": shape})
    if not any(p["x"] is not None and p["y"] is not None for p in points):
        return None
    b, refs = _budget(r), []
    if b.get("max_accuracy_drop") is not None and t.get("accuracy") is not None:
        refs.append(("y", 100 * (t["accuracy"] - b["max_accuracy_drop"]), "budget: max accuracy drop"))
    if b.get("min_accuracy") is not None:
        refs.append(("y", 100 * b["min_accuracy"], "budget: min accuracy"))
    if b.get("max_latency_p50_ms") is not None:
        refs.append(("x", b["max_latency_p50_ms"], f"budget: p50 ≤ {format_ms(b['max_latency_p50_ms'])} ms"))
    return svg.scatter(points, title="Accuracy against latency (p50, whisker to p90)",
                       x_label="latency per batch, ms", y_label="test accuracy, %",
                       y_fmt=lambda v: f"{v:.4g}%", y_bounds=(0, 100), ref_lines=refs)


def size_plot(r: dict, colors: dict) -> str | None:
    t = r.get("teacher") or {}
    rows = [{"label": a["name"], "value": a.get("size_bytes"), "color": colors[a["name"]],
             "text": format_bytes(a.get("size_bytes"))} for a in r.get("artifacts") or []]
    if t.get("size_bytes"):
        rows.insert(0, {"label": "teacher (fp32 ONNX)", "value": t["size_bytes"], "color": colors["teacher"],
                        "text": format_bytes(t["size_bytes"])})
    if not rows:
        return None
    limit = _budget(r).get("max_size_bytes")
    unit, div = ("MiB", 2**20) if max([row["value"] or 0 for row in rows] + [limit or 0]) >= 2**20 else ("KiB", 2**10)
    for row in rows:
        row["value"] = None if row["value"] is None else row["value"] / div
    return svg.bars(rows, title="Model file size", x_label=unit,
                    ref_lines=[("x", limit / div, f"budget ≤ {format_bytes(limit)}")] if limit else ())


def latency_distribution_plot(r: dict, colors: dict) -> str | None:
    t = r.get("teacher") or {}
    rows = []
    for label, entry, color in ([("teacher (fp32 ONNX)", t, colors["teacher"])]
                                + [(a["name"], a, colors[a["name"]]) for a in r.get("artifacts") or []]):
        dist = entry.get("latency_distribution_ms")
        if dist:
            q = dict(zip(dist["percentiles"], dist["values"]))
            if all(p in q for p in (0, 1, 25, 50, 75, 99, 100)):
                rows.append({"label": label, "color": color, "q": q})
    if not rows:
        return None
    return svg.boxes(rows, title="Latency distribution per run", x_label="latency per batch, ms")


def stage_time_plot(r: dict) -> str | None:
    stages = r.get("stages") or []
    if not stages:
        return None
    rows = []
    for s in stages:
        timed = s.get("status") in ("ran", "failed")  # cached and skipped stages took no time in this build
        rows.append({"label": s["name"], "value": s.get("seconds") if timed else None,
                     "color": STAGE_COLORS.get(s.get("status"), "#9ca3af"),
                     "text": (f"{s.get('seconds', 0):.1f} s" + (" (failed)" if s["status"] == "failed" else ""))
                     if timed else s.get("status", "")})
    total = r.get("build_seconds")
    title = "Time per stage" + (f" (build {total:.0f} s)" if total is not None else "")
    return svg.bars(rows, title=title, x_label="seconds")


def _figure(content: str | None) -> str:
    return f"<figure>{content}</figure>" if content else '<figure><div class="empty">no data for this plot</div></figure>'


def _best_label(checks: list[dict], best: str | None) -> str:
    if not best:
        return "no artifact"
    if any(c.get("artifact") == best and not c.get("passed") for c in checks):
        return f"no artifact passes all its checks; the most accurate: {escape(best)}"
    return f"best artifact: {escape(best)}"


def _best_summary(r: dict, best: str | None) -> str:
    a = next((a for a in r.get("artifacts") or [] if a["name"] == best), None)
    t = r.get("teacher") or {}
    if a is None:
        return ""
    bits = [f"accuracy {format_value(a.get('accuracy'), 'percent')}"]
    if a.get("accuracy") is not None and t.get("accuracy") is not None:
        bits[-1] += f" ({format_value(t['accuracy'] - a['accuracy'], 'points')} below the teacher)"
    lat, tlat = a.get("latency_ms") or {}, t.get("latency_ms") or {}
    if lat.get("p50") is not None:
        bits.append(f"p50 {format_ms(lat['p50'])} ms" + (f" ({tlat['p50'] / lat['p50']:.1f}x faster than the teacher)"
                                                  if tlat.get("p50") else ""))
    bits.append(f"size {format_bytes(a.get('size_bytes'))}" + (
        f" ({t['size_bytes'] / a['size_bytes']:.1f}x smaller)" if t.get("size_bytes") and a.get("size_bytes") else ""))
    return " — " + escape("; ".join(bits))


def _notes_html(r: dict) -> str:
    notes = artifact_notes(r)
    return ('<div class="box"><b>Artifact notes</b><ul>' + "".join(f"<li>{escape(n)}</li>" for n in notes)
            + "</ul></div>") if notes else ""


def _measured_note(r: dict) -> str:
    b = r.get("benchmark") or {}
    return (f"Latency and memory: {b.get('measured_on')}, batch {b.get('batch_size')}. "
            "These are measurements on the build host, not on the target device.")


def _artifact_table(r: dict, colors: dict) -> str:
    t = r.get("teacher") or {}
    head = ("<tr><th>artifact</th><th>runtime</th><th>accuracy</th><th>drop vs teacher</th><th>agreement</th>"
            "<th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>load ms</th><th>peak RSS</th><th>size</th></tr>")
    rows = []
    tl = t.get("latency_ms") or {}
    rows.append(f'<tr><td><span class="swatch" style="background:{colors["teacher"]}"></span>teacher '
                f"<code>{escape(str(t.get('arch')))}</code> ({t.get('params') or 0:,} params)</td>"
                f"<td>torch / onnxruntime</td><td class=n>{format_value(t.get('accuracy'), 'percent')}</td>"
                f"<td class=n></td><td class=n></td>"
                + "".join(f"<td class=n>{format_ms(tl.get(k))}</td>" for k in ("p50", "p90", "p99"))
                + f"<td class=n></td><td class=n></td><td class=n>{format_bytes(t.get('size_bytes'))}</td></tr>")
    for a in r.get("artifacts") or []:
        lat = a.get("latency_ms") or {}
        drop = (None if a.get("accuracy") is None or t.get("accuracy") is None else t["accuracy"] - a["accuracy"])
        runtime = a.get("runtime") or ""
        if a.get("runtime_version"):
            runtime += f" {a['runtime_version']}"
        rows.append(f'<tr><td><span class="swatch" style="background:{colors[a["name"]]}"></span>'
                    f"<code>{escape(a['name'])}</code></td><td>{escape(runtime)}</td>"
                    f"<td class=n>{format_value(a.get('accuracy'), 'percent')}</td>"
                    f"<td class=n>{format_value(drop, 'points')}</td>"
                    f"<td class=n>{format_value(a.get('teacher_agreement'), 'percent')}</td>"
                    + "".join(f"<td class=n>{format_ms(lat.get(k))}</td>" for k in ("p50", "p90", "p99"))
                    + f"<td class=n>{format_ms(a.get('load_ms'))}</td><td class=n>{format_bytes(a.get('peak_rss_bytes'))}"
                    f"</td><td class=n>{format_bytes(a.get('size_bytes'))}</td></tr>")
    for name in r.get("missing_artifacts") or []:
        rows.append(f'<tr class="fail"><td><code>{escape(name)}</code></td><td colspan="10">missing</td></tr>')
    return f"<table>{head}{''.join(rows)}</table>"


def _checks_table(checks: list[dict]) -> str:
    if not checks:
        return '<p class="sub">The budget sets no checks.</p>'
    rows = [f'<tr class="{"pass" if c.get("passed") else "fail"}"><td><code>{escape(c["name"])}</code></td>'
            f"<td>{escape(c.get('kind', 'budget'))}</td>"
            f"<td class=n>{escape(format_value(c.get('value'), c.get('unit')))}</td>"
            f"<td class=n>{escape(format_limit(c))}</td>"
            f'<td><span class="tag {"pass" if c.get("passed") else "fail"}">'
            f"{'pass' if c.get('passed') else 'FAIL'}</span></td><td>{escape(c.get('note', ''))}</td></tr>"
            for c in checks]
    return ("<table><tr><th>check</th><th>kind</th><th>value</th><th>limit</th><th>result</th><th>note</th></tr>"
            + "".join(rows) + "</table>")


def _reproduce(r: dict) -> str:
    ds, host, seeds = r.get("dataset") or {}, r.get("host") or {}, r.get("seeds") or {"pipeline": r.get("seed")}
    facts = [
        ("pipeline", f"{r.get('pipeline')} ({r.get('config_source')})"),
        ("config hash", r.get("config_hash")),
        ("target profile", f"{r.get('target')} (hash {str(r.get('target_profile_hash'))[:12]})"),
        ("dataset", f"{ds.get('name')}: train {ds.get('train')}, val {ds.get('val')}, test {ds.get('test')}"),
        ("dataset fingerprint (split)", ds.get("fingerprint")),
        ("dataset source fingerprint", ds.get("source_fingerprint")),
        ("seeds", ", ".join(f"{k} {v}" for k, v in seeds.items())),
        ("host CPU", f"{host.get('cpu')} ({host.get('arch')}, {host.get('cpu_count')} cores; "
                     f"{' '.join(host.get('cpu_flags') or []) or 'no listed flags'})"),
        ("host OS", host.get("os")),
    ]
    rows = "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(str(v))}</code></td></tr>" for k, v in facts)
    versions = r.get("versions") or {}
    vrows = "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(str(v))}</code></td></tr>"
                    for k, v in versions.items())
    config = json.dumps(r.get("config"), indent=2)
    return (f"<table>{rows}</table><h2>Versions</h2><table>{vrows}</table>"
            f'<details class="box"><summary>Pipeline config (as validated)</summary><pre>{escape(config)}</pre>'
            "</details>")


