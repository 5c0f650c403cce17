"""A gate check as data, and how every renderer (terminal, Markdown, HTML, JUnit) words it.

A check is a plain dict, stored in report.json:
    {"name": "latency_p50_ms[student_int8.tflite]", "artifact": "student_int8.tflite", "kind": "budget",
     "value": 0.21, "limit": 2.0, "op": "<=", "unit": "ms", "passed": true, "note": "..."}
`value` None means "not measured", which fails the check. `unit` says how to show value and limit.
"""

from __future__ import annotations


def make_check(name: str, artifact: str | None, value, limit, op: str, unit: str, note: str = "",
               kind: str = "budget", **extra) -> dict:
    if op not in ("<=", ">="):
        raise ValueError(f"op must be '<=' or '>=', not {op!r}")
    value = None if value is None else float(value)
    passed = value is not None and (value <= limit if op == "<=" else value >= limit)
    return {"name": name, "artifact": artifact, "kind": kind, "value": value, "limit": limit, "op": op,
            "unit": unit, "passed": bool(passed), **extra, **({"note": note} if note else {})}


def format_value(value, unit: str | None) -> str:
    if value is None:
        return "n/a"
    if unit == "points":
        return f"{100 * value:.2f} pt"
    if unit == "percent":
        return f"{100 * value:.2f}%"
    if unit == "change":
        return f"{100 * value:+.1f}%"
    if unit == "ms":
        return f"{format_ms(value)} ms"
    if unit == "bytes":
        return format_bytes(value)
    if unit == "ratio":
        return f"{value:.3f}x"
    if unit == "bool":
        return "yes" if value >= 1 else "no"
    if unit == "instructions":
        return f"{value:,.0f} instr"
    return f"{value:.4g}"


def format_ms(v) -> str:
    """Milliseconds with four significant digits: sub-millisecond models keep their resolution."""
    return "n/a" if v is None else f"{v:.4g}"


def format_bytes(n) -> str:
    if n is None:
        return "n/a"
    if n < 2**10:
        return f"{n:.0f} B"
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def format_limit(c: dict) -> str:
    """'<= 2.000 ms', '>= 90.00%'; 'required' for presence checks."""
    if c.get("unit") == "bool":
        return "required"
    return f"{_op(c)} {format_value(c['limit'], c.get('unit'))}"


def explain(c: dict) -> str:
    """One sentence for a failure message: what was measured against what."""
    if c.get("value") is None:
        return f"{c['name']}: not measured" + (f" ({c['note']})" if c.get("note") else "")
    verdict = "within" if c["passed"] else "outside"
    text = f"{c['name']}: {format_value(c['value'], c.get('unit'))} is {verdict} the limit {format_limit(c)}"
    return text + (f" ({c['note']})" if c.get("note") else "")


def format_check(c: dict) -> str:
    """One terminal line: PASS/FAIL, name, value, limit, note."""
    note = f"  ({c['note']})" if c.get("note") else ""
    limit = "" if c.get("unit") == "bool" else f" (limit {format_limit(c)})"
    return f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {format_value(c.get('value'), c.get('unit'))}{limit}{note}"


def _op(c: dict) -> str:
    return {"<=": "≤", ">=": "≥"}.get(c.get("op", "<="), c.get("op", "<="))
