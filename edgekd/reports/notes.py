"""One line per artifact that a reader must know before trusting its row: which converter made a TFLite file (and
which routes failed first), int8 files whose activations are not full integer, accuracies the host's arithmetic may
have changed. Shared by the Markdown and HTML reports."""

from __future__ import annotations


def artifact_notes(report: dict) -> list[str]:
    notes = []
    for a in report.get("artifacts") or []:
        conv = a.get("converter") or {}
        if conv.get("converter"):
            version = (conv.get("versions") or {}).get(conv["converter"], "")
            text = f"{a['name']}: made by {conv['converter']} {version}".rstrip()
            if conv.get("static_batch"):
                text += f" (static batch {conv['static_batch']})"
            if conv.get("activations") == "dynamic":
                text += ("; int8 weights with dynamic activations: float input and output, runs on CPU/XNNPACK, "
                         "not on int8-only accelerators")
            failed = [t for t in conv.get("routes_tried") or [] if not t.get("ok")]
            if failed:
                text += "; after " + "; ".join(
                    f"{t['converter']}{' (' + t['activations'] + ')' if t.get('activations') else ''} failed: "
                    f"{t.get('error', '')}" for t in failed)
            notes.append(text)
        caveat = (a.get("accuracy_measured_on") or {}).get("caveat")
        if caveat:
            notes.append(f"{a['name']}: accuracy {caveat}")
    return notes
