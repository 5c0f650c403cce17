"""report.junit.xml: each gate check as one JUnit test case, so CI systems list them (failures marked)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from edgekd.reports.checks import explain, format_limit, format_value


def to_junit(r: dict) -> str:
    gate = r.get("gate") or {}
    checks = gate.get("checks") or []
    failures = sum(1 for c in checks if not c.get("passed"))
    counts = {"tests": str(len(checks)), "failures": str(failures), "errors": "0", "skipped": "0", "time": "0"}
    root = ET.Element("testsuites", {"name": "edgekd gate", **counts})
    suite = ET.SubElement(root, "testsuite", {"name": f"edgekd.gate.{r.get('pipeline')}.{r.get('target')}", **counts,
                                              **({"timestamp": r["created_at"]} if r.get("created_at") else {})})
    props = ET.SubElement(suite, "properties")
    for key, value in (("pipeline", r.get("pipeline")), ("target", r.get("target")),
                       ("config_hash", r.get("config_hash")), ("passed", gate.get("passed")),
                       ("best_artifact", gate.get("best_artifact")),
                       ("edgekd", (r.get("versions") or {}).get("edgekd"))):
        ET.SubElement(props, "property", {"name": key, "value": str(value)})
    for c in checks:
        case = ET.SubElement(suite, "testcase", {"classname": f"edgekd.{c.get('kind', 'budget')}",
                                                 "name": c["name"], "time": "0"})
        detail = (f"value {format_value(c.get('value'), c.get('unit'))}, limit {format_limit(c)}"
                  + (f"; artifact {c['artifact']}" if c.get("artifact") else "")
                  + (f"; {c['note']}" if c.get("note") else ""))
        if c.get("passed"):
            ET.SubElement(case, "system-out").text = detail
        else:
            ET.SubElement(case, "failure", {"message": explain(c), "type": f"{c.get('kind', 'budget')} check"}).text = detail
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
