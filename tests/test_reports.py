"""Reports and release gating: HTML rendered by a real headless Chromium, JUnit, gate re-evaluation, baselines.

The slow tests read the real digits build (`digits_run`); the fast ones exercise the pure pieces (budget config,
regression comparison, SVG scales) on small report objects.
"""

import copy
import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import read_report, run_cli, write_pipeline
from edgekd.config import BudgetConfig, PipelineConfig, RegressionConfig, load_pipeline, parse_section
from edgekd.errors import ConfigError
from edgekd.reports import svg
from edgekd.reports.regression import compare_to_baseline

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ["student_fp32.onnx", "student_int8.onnx", "student_fp32.tflite", "student_int8.tflite"]


def rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


def screenshot(html: Path, png: Path, profile: Path) -> np.ndarray:
    """Render a page in Debian's chromium, headless, offline; return the image as an (H, W, 3) array."""
    assert CHROMIUM.is_file(), "chromium is missing: `make setup` installs it (apt-get install chromium)"
    proc = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={png}",
                           "--window-size=1200,2000", html.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB"))


def pixels_of(img: np.ndarray, color: str) -> np.ndarray:
    """(row, col) of every pixel drawn exactly in `color`."""
    return np.argwhere((img == np.array(rgb(color), dtype=img.dtype)).all(axis=2))


def gate_json(*args) -> tuple[int, dict]:
    proc = run_cli("gate", *args, "--json")
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def baseline_from(run_dir: Path, path: Path, latency_factor: float = 1.0, accuracy_delta: float = 0.0) -> Path:
    """A baseline report made from a real one: every artifact's latencies times `latency_factor`, accuracy plus
    `accuracy_delta` (a faster or more accurate "last release")."""
    r = read_report(run_dir)
    for a in r["artifacts"]:
        a["latency_ms"] = {k: v * latency_factor for k, v in a["latency_ms"].items()}
        a["accuracy"] += accuracy_delta
    path.write_text(json.dumps(r))
    return path


# ------------------------------------------------------------------------------------------ real build (slow)

@pytest.mark.slow
def test_build_writes_every_format_and_report_command_renders_them(digits_run):
    r = read_report(digits_run)
    for name in ("report.json", "report.md", "report.html", "report.junit.xml"):
        assert (digits_run / name).is_file(), name
    html = (digits_run / "report.html").read_text()
    # self-contained: no script, nothing fetched
    for needle in ("<script", "http://", "https://", "src=", "@import", "url("):
        assert needle not in html, needle
    assert html.count('<svg class="plot"') == 4 and "Gate PASSED" in html
    for fmt, name in (("html", "report.html"), ("md", "report.md"), ("junit", "report.junit.xml")):
        proc = run_cli("report", digits_run, "--format", fmt)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == (digits_run / name).read_text(), fmt
    assert json.loads(run_cli("report", digits_run, "--format", "json").stdout) == r
    bad = run_cli("report", digits_run, "--format", "pdf")
    assert bad.returncode == 2 and "unknown format" in bad.stderr


@pytest.mark.slow
def test_report_json_carries_what_reproduces_the_decision(digits_run):
    r = read_report(digits_run)
    v = r["versions"]
    for dist in ("edgekd", "python", "torch", "onnx", "onnxruntime", "onnx2tf", "tensorflow", "ai-edge-litert",
                 "numpy"):
        assert v[dist], dist
    # the runtime versions the measuring processes actually loaded
    assert r["runtime_versions"] == {"onnxruntime": v["onnxruntime"], "tflite": v["ai-edge-litert"]}
    assert r["host"]["cpu"] and r["host"]["arch"] and r["host"]["cpu_count"] >= 1 and r["host"]["os"]
    # the stored config is complete: it re-validates to the same hash
    cfg = parse_section(PipelineConfig, r["config"], "report.json", prefix="")
    assert cfg.digest() == r["config_hash"]
    assert len(r["dataset"]["fingerprint"]) == 64 and len(r["dataset"]["source_fingerprint"]) == 64
    assert r["seed"] == 0 and r["seeds"]["pipeline"] == 0
    # the student's BatchNorm statistics were re-estimated after distillation and the report says which were kept
    bn = r["student"]["distill"]["batchnorm_recalibration"]
    assert bn["policy"] == "auto" and bn["images"] > 0 and isinstance(bn["kept"], bool)
    assert bn["kept"] == (bn["val_accuracy_recalibrated"] > bn["val_accuracy_running"])
    assert r["student"]["val_accuracy"] == max(bn["val_accuracy_running"], bn["val_accuracy_recalibrated"])
    assert f"- BatchNorm statistics re-estimated on {bn['images']} training images" in (digits_run / "report.md").read_text()
    for entry in [r["teacher"], *r["artifacts"]]:
        dist = entry["latency_distribution_ms"]
        assert len(dist["percentiles"]) == len(dist["values"]) and dist["values"] == sorted(dist["values"])
        q = dict(zip(dist["percentiles"], dist["values"]))
        assert q[0] <= entry["latency_ms"]["p50"] <= q[100]
        assert q[50] == pytest.approx(entry["latency_ms"]["p50"])


@pytest.mark.slow
def test_html_report_renders_with_its_plots_in_headless_chromium(digits_run, tmp_path):
    img = screenshot(digits_run / "report.html", tmp_path / "report.png", tmp_path / "chromium-profile")
    assert img.shape[:2] == (2000, 1200)
    w = img.shape[1]
    # The page is not blank: the verdict banner is drawn in the pass colour.
    assert len(pixels_of(img, "#15803d")) > 20_000
    # The time-per-stage bars are the last plot (bottom right): everything above them is the plot area, and the
    # tables below (whose colour swatches would also match) are left out of the counts that follow.
    stage = pixels_of(img, "#0f766e")
    assert len(stage) > 2_000 and (stage[:, 1] > w / 2).all()
    plots = img[:stage[:, 0].max() + 40]
    # The teacher (red) is in the scatter and the box plot (left column) and the size bars (right column).
    red = pixels_of(plots, svg.TEACHER_COLOR)
    assert (red[:, 1] < w / 2).sum() > 100 and (red[:, 1] > w / 2).sum() > 2_000, "teacher missing from a plot"
    # Every artifact has its colour in both columns: marker and box (left), size bar (right).
    for i, name in enumerate(ARTIFACTS):
        px = pixels_of(plots, svg.color_for(i))
        assert (px[:, 1] < w / 2).sum() > 100 and (px[:, 1] > w / 2).sum() > 50, (name, len(px))
    # The budget's accuracy floor is drawn on the scatter (left column).
    budget = pixels_of(plots, svg.BUDGET_COLOR)
    assert len(budget) > 100 and (budget[:, 1] < w / 2).all()


@pytest.mark.slow
def test_junit_has_one_case_per_gate_check_and_marks_failures(digits_run, tmp_path):
    r = read_report(digits_run)
    suite = ET.parse(digits_run / "report.junit.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [c["name"] for c in r["gate"]["checks"]]
    assert suite.get("tests") == str(len(cases)) and suite.get("failures") == "0"
    assert not suite.findall(".//failure")

    # The same stored results against a budget they cannot meet: re-evaluated, not rebuilt.
    tight = write_pipeline(tmp_path / "tight.yaml", name="digits",
                           budget={"max_latency_p50_ms": 1e-6, "per_artifact": {"student_int8.tflite":
                                                                               {"min_accuracy": 0.999}}})
    code, result = gate_json(digits_run, "--pipeline", tight, "--out", tmp_path / "regated")
    junit = tmp_path / "regated" / "report.junit.xml"
    assert code == 1 and result["passed"] is False
    root = ET.parse(junit).getroot()
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == [c["name"] for c in result["checks"]]
    failed = {c.get("name") for c in cases if c.find("failure") is not None}
    assert failed == {c["name"] for c in result["checks"] if not c["passed"]}
    assert failed == {f"latency_p50_ms[{a}]" for a in ARTIFACTS} | {"accuracy[student_int8.tflite]"}
    assert root.get("failures") == str(len(failed)) and root.get("tests") == str(len(cases))
    message = next(c for c in cases if c.get("name") == "accuracy[student_int8.tflite]").find("failure").get("message")
    assert "outside the limit ≥ 99.90%" in message


@pytest.mark.slow
def test_gate_reevaluates_stored_results_without_rebuilding(digits_copy):
    stored = read_report(digits_copy)
    before = {p: p.stat().st_mtime_ns for p in (digits_copy / "stages").rglob("*")}
    code, result = gate_json(digits_copy)
    assert code == 0 and result["checks"] == stored["gate"]["checks"]
    assert result["best_artifact"] == stored["gate"]["best_artifact"]

    # Change a stored result: the gate follows it.
    r = copy.deepcopy(stored)
    art = next(a for a in r["artifacts"] if a["name"] == "student_int8.tflite")
    art["accuracy"] = r["teacher"]["accuracy"] - 0.2
    (digits_copy / "report.json").write_text(json.dumps(r))
    code, result = gate_json(digits_copy / "report.json")
    assert code == 1
    assert [c["name"] for c in result["checks"] if not c["passed"]] == ["accuracy_drop[student_int8.tflite]"]
    assert result["best_artifact"] != "student_int8.tflite"

    # Change the stored budget: the gate uses the pipeline config the report carries.
    r = copy.deepcopy(stored)
    r["config"]["budget"]["max_size_bytes"] = 12_000
    (digits_copy / "report.json").write_text(json.dumps(r))
    proc = run_cli("gate", digits_copy)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    sizes = {a["name"]: a["size_bytes"] for a in r["artifacts"]}
    assert {ln.split()[1].rstrip(":") for ln in proc.stdout.splitlines() if ln.startswith("FAIL")} == \
        {f"size_bytes[{n}]" for n, s in sizes.items() if s > 12_000}
    assert "gate FAILED" in proc.stdout
    assert before == {p: p.stat().st_mtime_ns for p in (digits_copy / "stages").rglob("*")}  # nothing rebuilt


@pytest.mark.slow
def test_baseline_comparison_that_passes(digits_run, tmp_path):
    # the last release was a little slower and a little less accurate: no regression
    base = baseline_from(digits_run, tmp_path / "baseline.json", latency_factor=1.05, accuracy_delta=-0.01)
    code, result = gate_json(digits_run, "--baseline", base)
    assert code == 0 and result["passed"] is True and result["regression"]["passed"] is True
    reg = [c for c in result["checks"] if c["kind"] == "regression"]
    assert {c["name"] for c in reg} == ({f"regression.latency_p50_increase[{a}]" for a in ARTIFACTS}
                                        | {f"regression.accuracy_decrease[{a}]" for a in ARTIFACTS})
    assert all(c["passed"] for c in reg)
    lat = next(c for c in reg if c["name"] == "regression.latency_p50_increase[student_int8.tflite]")
    assert lat["value"] == pytest.approx(1 / 1.05 - 1) and lat["limit"] == 0.10
    assert result["regression"]["warnings"] == []  # same host, same data, same target
    proc = run_cli("gate", digits_run, "--baseline", base)
    assert proc.returncode == 0 and "gate passed" in proc.stdout


@pytest.mark.slow
def test_baseline_comparison_fails_for_a_latency_regression(digits_run, tmp_path):
    # the last release was three times faster: every artifact's latency regressed by ~200%
    base = baseline_from(digits_run, tmp_path / "baseline.json", latency_factor=1 / 3)
    proc = run_cli("gate", digits_run, "--baseline", base, "--out", tmp_path / "regated")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failing = {ln.split()[1].rstrip(":") for ln in proc.stdout.splitlines() if ln.startswith("FAIL")}
    assert failing == {f"regression.latency_p50_increase[{a}]" for a in ARTIFACTS}
    assert "gate FAILED" in proc.stdout and "+200.0%" in proc.stdout
    cases = ET.parse(tmp_path / "regated" / "report.junit.xml").getroot().findall(".//testcase")
    assert {c.get("name") for c in cases if c.find("failure") is not None} == failing
    assert all(c.get("classname") == "edgekd.regression" for c in cases if c.find("failure") is not None)
    # the tolerance comes from the pipeline YAML: allowing +250% lets the same comparison pass
    loose = write_pipeline(tmp_path / "loose.yaml", name="digits", budget={"regression": {"max_latency_increase": 2.5}})
    assert run_cli("gate", digits_run, "--baseline", base, "--pipeline", loose).returncode == 0


@pytest.mark.slow
def test_gate_refuses_bad_input_with_exit_2(digits_run, tmp_path):
    cases = [(tmp_path / "none.json", "no report at"), (tmp_path / "bad.json", "not valid JSON"),
             (tmp_path / "other.json", "not an edgekd report")]
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "other.json").write_text('{"schema": "x"}')
    for path, needle in cases:
        for args in ((path,), (digits_run, "--baseline", path)):
            proc = run_cli("gate", *args)
            assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, args
    r = read_report(digits_run)
    r["config"]["budget"]["max_latncy_p50_ms"] = 1
    (tmp_path / "typo.json").write_text(json.dumps(r))
    proc = run_cli("gate", tmp_path / "typo.json")
    assert proc.returncode == 2 and "did you mean 'max_latency_p50_ms'" in proc.stderr


@pytest.mark.slow
def test_failed_gate_still_writes_every_report_and_names_the_best_artifact(digits_copy, tmp_path):
    pipeline = write_pipeline(tmp_path / "tight.yaml", name="digits", budget={"max_latency_p50_ms": 1e-6})
    proc = run_cli("build", "--pipeline", pipeline, "--run-dir", digits_copy)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    r = read_report(digits_copy)
    assert r["gate"]["passed"] is False and r["gate"]["best_artifact"] in ARTIFACTS
    html = (digits_copy / "report.html").read_text()
    assert "Gate FAILED" in html and "Failing checks" in html and r["gate"]["best_artifact"] in html
    suite = ET.parse(digits_copy / "report.junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == str(len(ARTIFACTS))
    assert "Gate: FAILED" in (digits_copy / "report.md").read_text()
    assert all((digits_copy / a["path"]).is_file() for a in r["artifacts"])
    img = screenshot(digits_copy / "report.html", tmp_path / "failed.png", tmp_path / "profile")
    assert len(pixels_of(img, "#b91c1c")) > 20_000  # the red verdict banner


# ------------------------------------------------------------------------------------------ pure pieces (fast)

def _report(**latencies) -> dict:
    return {"host": {"cpu": "cpu A"}, "dataset": {"fingerprint": "d1"}, "target": "t",
            "artifacts": [{"name": n, "accuracy": 0.9, "latency_ms": {"p50": p50, "p90": p50 * 2}, "size_bytes": 1000,
                           "peak_rss_bytes": 2**20} for n, p50 in latencies.items()]}


def test_regression_checks_and_caveats():
    now, then = _report(a=1.2, b=1.0), _report(a=1.0, b=1.0, c=1.0)
    then["host"]["cpu"] = "cpu B"
    out = compare_to_baseline(now, then, RegressionConfig(max_size_increase=0.0))
    by = {c["name"]: c for c in out["checks"]}
    assert by["regression.latency_p50_increase[a]"]["value"] == pytest.approx(0.2)
    assert not by["regression.latency_p50_increase[a]"]["passed"]
    assert by["regression.latency_p50_increase[b]"]["passed"] and by["regression.size_increase[b]"]["passed"]
    assert not by["regression.present[c]"]["passed"]  # built before, gone now
    assert out["passed"] is False and any("another host CPU" in w for w in out["warnings"])
    only_b = compare_to_baseline(now, then, RegressionConfig(latency_percentile="p90"), artifacts=["b"])
    assert {c["name"] for c in only_b["checks"]} == {"regression.accuracy_decrease[b]",
                                                     "regression.latency_p90_increase[b]"}
    none = compare_to_baseline(now, then, RegressionConfig(max_latency_increase=None, max_accuracy_decrease=None))
    assert [c["name"] for c in none["checks"]] == ["regression.present[c]"]


def test_budget_per_artifact_limits_and_regression_section(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("teacher: {train: {epochs: 1}}\nbudget:\n  artifacts: [student_int8.tflite]\n"
                    "  max_latency_p50_ms: 5\n  per_artifact:\n    student_fp32.onnx: {min_accuracy: 0.9}\n"
                    "    student_int8.tflite: {max_latency_p50_ms: 2}\n"
                    "  regression: {max_latency_increase: 0.2, latency_percentile: p90}\n")
    b = load_pipeline(path).budget
    assert b.limits_for("student_int8.tflite").max_latency_p50_ms == 2.0
    assert b.limits_for("student_int8.tflite").max_accuracy_drop == 0.015  # the budget-wide default still applies
    fp32 = b.limits_for("student_fp32.onnx")  # not in `artifacts`: only its own limits
    assert fp32.min_accuracy == 0.9 and fp32.max_latency_p50_ms is None and fp32.max_accuracy_drop is None
    assert b.limits_for("student_fp32.tflite") is None
    assert b.regression.max_latency_increase == 0.2 and b.regression.latency_percentile == "p90"
    for text, needle in (("per_artifact: {x: {max_latncy_p50_ms: 1}}", "did you mean 'max_latency_p50_ms'"),
                         ("min_accelerator_node_fraction: 1.5", "must be in [0, 1]"),
                         ("regression: {max_latency_increase: -1}", "must be >= 0")):
        path.write_text(f"teacher: {{train: {{epochs: 1}}}}\nbudget: {{{text}}}\n")
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            load_pipeline(path)


def test_accelerator_placement_check_reads_the_placement_hook():
    from edgekd.stages.gate import evaluate_budget

    budget = parse_section(BudgetConfig, {"max_accuracy_drop": None, "required_artifacts": [],
                                          "min_accelerator_node_fraction": 0.9}, "t", "")
    evaluation = {"teacher": {"accuracy": 0.9, "params": 10}, "student_params": 1,
                  "artifacts": {"a": {"accuracy": 0.9}, "b": {"accuracy": 0.9}}}
    result = evaluate_budget(budget, evaluation, None, placement={"a": 0.95})
    by = {c["name"]: c for c in result["checks"]}
    assert by["accelerator_node_fraction[a]"]["passed"]
    assert not by["accelerator_node_fraction[b]"]["passed"] and "not measured" in by["accelerator_node_fraction[b]"]["note"]


def test_svg_scales_pick_readable_ticks():
    lin = svg.Scale.fit([0.0, 98.0], 0, 100, zero=True)
    assert not lin.log and lin.ticks() == [0.0, 25.0, 50.0, 75.0, 100.0]
    log = svg.Scale.fit([0.004, 0.5], 0, 100)
    assert log.log and 0.01 in log.ticks() and 0.1 in log.ticks()
    assert log(0.004) < log(0.05) < log(0.5)
    flat = svg.Scale.fit([3.0, 3.0], 0, 100)  # one value: still a usable axis
    assert flat.lo < 3.0 < flat.hi


def test_artifact_notes_name_the_converter_fallbacks_and_host_caveats(digits_run):
    """What a reader must know beside a row: the route that made a TFLite file and what failed first, int8 files with
    dynamic activations, a host-arithmetic caveat; in Markdown and HTML alike."""
    from edgekd.reports.html import to_html
    from edgekd.reports.render import to_markdown

    r = copy.deepcopy(read_report(digits_run))
    arts = {a["name"]: a for a in r["artifacts"]}
    arts["student_int8.tflite"]["converter"].update(
        converter="litert-torch", versions={"litert-torch": "0.10.0"}, static_batch=1, activations="dynamic",
        routes_tried=[{"converter": "onnx2tf", "activations": "static", "error": "agrees on only 0.750"},
                      {"converter": "litert-torch", "activations": "dynamic", "ok": True}])
    arts["student_int8.onnx"]["accuracy_measured_on"] = {"caveat": "computed by this x86 host without VNNI"}
    md, html = to_markdown(r), to_html(r)
    line = ("student_int8.tflite: made by litert-torch 0.10.0 (static batch 1); int8 weights with dynamic activations"
            ": float input and output, runs on CPU/XNNPACK, not on int8-only accelerators; after onnx2tf (static) "
            "failed: agrees on only 0.750")
    assert f"- {line}" in md and line in html
    assert "student_fp32.tflite: made by onnx2tf 1.29.24" in md
    assert "- student_int8.onnx: accuracy computed by this x86 host without VNNI" in md
