"""Regressions against a baseline report (the last release): a pure function of two report objects.

For every artifact the baseline has (limited to the budget's `artifacts` when it names some):
  regression.accuracy_decrease[A]     baseline accuracy - current accuracy    <= max_accuracy_decrease (absolute)
  regression.latency_p50_increase[A]  current latency / baseline latency - 1  <= max_latency_increase  (relative)
  regression.size_increase[A]         current size / baseline size - 1        <= max_size_increase
  regression.peak_rss_increase[A]     current peak RSS / baseline's - 1       <= max_peak_rss_increase
  regression.present[A]               the artifact is still built
Tolerances set to None are not checked. Differences that make a comparison doubtful (another host CPU, another
dataset, another target) are returned as warnings next to the checks, not hidden.
"""

from __future__ import annotations

from edgekd.config import RegressionConfig
from edgekd.reports.checks import format_value, make_check


def compare_to_baseline(current: dict, baseline: dict, tol: RegressionConfig,
                        artifacts: list[str] | None = None) -> dict:
    """-> {"passed", "checks", "warnings", "baseline": {what the baseline was}}."""
    now = {a["name"]: a for a in current.get("artifacts", [])}
    before = {a["name"]: a for a in baseline.get("artifacts", [])}
    names = [n for n in before if artifacts is None or n in artifacts]
    checks: list[dict] = []
    warnings = _comparability(current, baseline)
    pct = tol.latency_percentile

    def add(name, artifact, value, limit, unit, note, base, cur):
        checks.append(make_check(f"regression.{name}[{artifact}]", artifact, value, limit, "<=", unit, note,
                                 kind="regression", baseline=base, current=cur))

    for name in names:
        a, b = now.get(name), before[name]
        if a is None:
            checks.append(make_check(f"regression.present[{name}]", name, 0.0, 1.0, ">=", "bool",
                                     "built in the baseline, missing now", kind="regression"))
            continue
        if tol.max_accuracy_decrease is not None:
            if a.get("accuracy") is None or b.get("accuracy") is None:
                warnings.append(f"{name}: accuracy not compared (missing in one report)")
            else:
                add("accuracy_decrease", name, b["accuracy"] - a["accuracy"], tol.max_accuracy_decrease, "points",
                    f"{format_value(a['accuracy'], 'percent')} now, {format_value(b['accuracy'], 'percent')} "
                    f"in the baseline", b["accuracy"], a["accuracy"])
        cur_lat, base_lat = (a.get("latency_ms") or {}).get(pct), (b.get("latency_ms") or {}).get(pct)
        for key, limit, cur, base, unit in (
                (f"latency_{pct}_increase", tol.max_latency_increase, cur_lat, base_lat, "ms"),
                ("size_increase", tol.max_size_increase, a.get("size_bytes"), b.get("size_bytes"), "bytes"),
                ("peak_rss_increase", tol.max_peak_rss_increase, a.get("peak_rss_bytes"), b.get("peak_rss_bytes"),
                 "bytes")):
            if limit is None:
                continue
            if not cur or not base:
                warnings.append(f"{name}: {key.removesuffix('_increase')} not compared (not measured in "
                                f"{'this build' if not cur else 'the baseline'})")
                continue
            add(key, name, cur / base - 1.0, limit, "change", f"{format_value(cur, unit)} now, {format_value(base, unit)} in the baseline",
                base, cur)
    return {"passed": all(c["passed"] for c in checks), "checks": checks, "warnings": warnings,
            "baseline": {"pipeline": baseline.get("pipeline"), "target": baseline.get("target"),
                         "config_hash": baseline.get("config_hash"),
                         "edgekd": (baseline.get("versions") or {}).get("edgekd"),
                         "host_cpu": (baseline.get("host") or {}).get("cpu"),
                         "created_at": baseline.get("created_at")}}


def _comparability(current: dict, baseline: dict) -> list[str]:
    out = []
    cpu_now, cpu_then = (current.get("host") or {}).get("cpu"), (baseline.get("host") or {}).get("cpu")
    if cpu_now != cpu_then:
        out.append(f"latency was measured on another host CPU in the baseline ({cpu_then!r}, now {cpu_now!r}): "
                   "latency changes may be the machine's, not the model's")
    ds_now, ds_then = (current.get("dataset") or {}).get("fingerprint"), (baseline.get("dataset") or {}).get("fingerprint")
    if ds_now != ds_then:
        out.append("the test data differs from the baseline's (dataset fingerprint changed): accuracies are not "
                   "measured on the same images")
    if current.get("target") != baseline.get("target"):
        out.append(f"the baseline was built for target {baseline.get('target')!r}, this build for "
                   f"{current.get('target')!r}")
    return out
