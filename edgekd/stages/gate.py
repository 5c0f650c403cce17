"""gate: check the budget (accuracy drop vs teacher, accuracy, latency, size, memory, placement) per artifact."""

from edgekd.config import BudgetConfig, parse_section
from edgekd.errors import ConfigError
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.reports.build import gate_inputs
from edgekd.reports.checks import format_check, make_check
from edgekd.reports.regression import compare_to_baseline


def evaluate_budget(budget, evaluation: dict, bench: dict | None, placement: dict | None = None) -> dict:
    """Pure function of stored results -> {"passed", "checks": [{name, artifact, value, limit, passed, unit}],
    "best_artifact"}.

    `evaluation` is the evaluate stage's summary, `bench` the benchmark stage's; `placement` maps an artifact
    name to the fraction of its graph's nodes that run on the target's accelerator (None or absent: unknown).
    """
    teacher_acc = evaluation["teacher"]["accuracy"]
    arts = evaluation.get("artifacts", {})
    measured = (bench or {}).get("results", {})
    placement = placement or {}
    if not placement:  # during a build: the benchmark stage's execution-provider placement
        accel_arts = ((bench or {}).get("accelerator") or {}).get("artifacts") or {}
        placement = {n: (r.get("placement") or {}).get("fraction_on_provider") for n, r in accel_arts.items()}
    checks: list[dict] = []

    def add(name: str, artifact: str | None, value, limit, op: str, unit: str, note: str = "") -> None:
        checks.append(make_check(name, artifact, value, limit, op, unit, note))

    for req in [*budget.required_artifacts, *(n for n in budget.per_artifact if n not in budget.required_artifacts)]:
        add(f"present[{req}]", req, 1.0 if req in arts else 0.0, 1.0, ">=", "bool",
            "" if req in arts else "artifact missing (its stage failed or is disabled)")
    order = budget.artifacts if budget.artifacts is not None else sorted(arts)
    for name in [*order, *(n for n in budget.per_artifact if n not in order)]:
        limits = budget.limits_for(name)
        if name not in arts or limits is None:
            continue
        acc = arts[name]["accuracy"]
        # an accuracy measured on a capped subset (evaluate.target_samples) is compared with the teacher's on it
        ref_acc = arts[name].get("teacher_accuracy_same_samples", teacher_acc)
        if limits.max_accuracy_drop is not None:
            add(f"accuracy_drop[{name}]", name, ref_acc - acc, limits.max_accuracy_drop, "<=", "points")
        if limits.max_relative_accuracy_drop is not None:
            rel = (ref_acc - acc) / ref_acc if ref_acc else 0.0
            add(f"relative_accuracy_drop[{name}]", name, rel, limits.max_relative_accuracy_drop, "<=", "percent")
        if limits.min_accuracy is not None:
            add(f"accuracy[{name}]", name, acc, limits.min_accuracy, ">=", "percent")
        if limits.max_params_ratio_vs_teacher is not None:
            ratio = evaluation["student_params"] / evaluation["teacher"]["params"]
            add(f"params_ratio_vs_teacher[{name}]", name, ratio, limits.max_params_ratio_vs_teacher, "<=", "ratio")
        if limits.min_accelerator_node_fraction is not None:
            frac = placement.get(name)
            add(f"accelerator_node_fraction[{name}]", name, frac, limits.min_accelerator_node_fraction, ">=",
                "percent", "" if frac is not None else
                "placement not measured (no execution-provider placement report for this artifact)")
        m = measured.get(name)
        if limits.max_latency_ratio_vs_teacher is not None:
            ref = measured.get("teacher_fp32.onnx")
            ratio = m["latency_ms"]["p50"] / ref["latency_ms"]["p50"] if m and ref else None
            add(f"latency_ratio_vs_teacher[{name}]", name, ratio, limits.max_latency_ratio_vs_teacher, "<=", "ratio",
                "p50 / teacher fp32 ONNX p50, same host and run" if ratio is not None
                else "not measured (benchmark.include_teacher must be on)")
        for key, limit, value, unit in (
                ("latency_p50_ms", limits.max_latency_p50_ms, m and m["latency_ms"]["p50"], "ms"),
                ("latency_p90_ms", limits.max_latency_p90_ms, m and m["latency_ms"]["p90"], "ms"),
                ("size_bytes", limits.max_size_bytes, m and m["size_bytes"], "bytes"),
                ("peak_rss_bytes", limits.max_peak_rss_bytes, m and m["peak_rss_bytes"], "bytes")):
            if limit is not None:
                add(f"{key}[{name}]", name, value, limit, "<=", unit, "" if value is not None else "not measured")
        _arm_instruction_checks(name, limits, (bench or {}).get("arm_instructions") or {}, add)
    _accelerator_checks(budget, teacher_acc, (bench or {}).get("accelerator") or {}, add)
    passed = all(c["passed"] for c in checks)
    return {"passed": passed, "checks": checks, "best_artifact": _best(arts, measured, checks)}


def _arm_instruction_checks(name: str, limits, counts: dict, add) -> None:
    """Emulated aarch64 instructions per inference (stage arm_instructions), on each CPU the target emulates:
    absolute, and relative to the teacher's fp32 ONNX on the same CPU."""
    if limits.max_arm_instructions is None and limits.max_arm_instructions_ratio_vs_teacher is None:
        return
    mine, teacher = counts.get(name) or {}, counts.get("teacher_fp32.onnx") or {}
    if not mine:
        for key in ("arm_instructions", "arm_instructions_ratio_vs_teacher"):
            limit = getattr(limits, f"max_{key}")
            if limit is not None:
                add(f"{key}[{name}]", name, None, limit, "<=", "instructions" if key == "arm_instructions" else "ratio",
                    "not counted (the target profile names no emulate_cpus, or benchmark.arm_instructions is off)")
        return
    for cpu, n in mine.items():
        if limits.max_arm_instructions is not None:
            add(f"arm_instructions@{cpu}[{name}]", name, n, limits.max_arm_instructions, "<=", "instructions",
                f"emulated {cpu}, per inference; a count, not a time")
        if limits.max_arm_instructions_ratio_vs_teacher is not None:
            ref = teacher.get(cpu)
            add(f"arm_instructions_ratio_vs_teacher@{cpu}[{name}]", name, n / ref if ref else None,
                limits.max_arm_instructions_ratio_vs_teacher, "<=", "ratio",
                f"vs teacher fp32 ONNX on emulated {cpu}" if ref else "teacher not counted")


def _accelerator_checks(budget, teacher_acc, accel: dict, add) -> None:
    """The target profile's execution provider (benchmark stage): the profile's min_accelerator_node_fraction,
    failing with the ops that fell back to the CPU, and the accuracy measured through the EP vs the teacher."""
    ep = accel.get("execution_provider")
    for name, rec in sorted((accel.get("artifacts") or {}).items()):
        if budget.artifacts is not None and name not in budget.artifacts:
            continue
        p = rec.get("placement") or {}
        if accel.get("min_node_fraction") is not None:
            off = ", ".join(f"{op} x{n}" for op, n in sorted((p.get("ops_elsewhere") or {}).items()))
            add(f"accelerator_placement[{name}]", name, p.get("fraction_on_provider"), accel["min_node_fraction"],
                ">=", "percent", f"target profile: nodes on {ep}"
                + (f"; not on it: {off}" if off else "") + (f" ({p.get('source')})" if p.get("source") else ""))
        limits = budget.limits_for(name) if hasattr(budget, "limits_for") else budget
        drop_limit = getattr(limits, "max_accuracy_drop", None) if limits is not None else None
        if rec.get("accuracy") is not None and drop_limit is not None:
            add(f"accelerator_accuracy_drop[{name}]", name, teacher_acc - rec["accuracy"], drop_limit, "<=", "points",
                f"accuracy through {ep} ({rec.get('samples')} test images) vs the teacher")


def regate(report: dict, budget: BudgetConfig | None = None, baseline: dict | None = None,
           where: str = "report.json") -> dict:
    """Re-evaluate a stored report's gate without rebuilding anything.

    The budget is the one stored in the report's pipeline config unless `budget` is given; with a `baseline`
    report, regressions against it are checked too (tolerances: `budget.regression`). Returns the gate object
    of a report: {"passed", "checks", "best_artifact"[, "regression": {"passed", "warnings", "baseline"}]}.
    """
    if budget is None:
        stored = (report.get("config") or {}).get("budget")
        if not isinstance(stored, dict):
            raise ConfigError(f"{where}: holds no pipeline budget (config.budget); rebuild it with this edgekd")
        budget = parse_section(BudgetConfig, stored, where, prefix="config.budget.")
    evaluation, bench, placement = gate_inputs(report)
    if evaluation["teacher"]["accuracy"] is None:
        raise ConfigError(f"{where}: holds no teacher accuracy; the build did not get to evaluate")
    result = evaluate_budget(budget, evaluation, bench, placement)
    if baseline is None:
        return result
    reg = compare_to_baseline(report, baseline, budget.regression, budget.artifacts)
    checks = result["checks"] + reg["checks"]
    return {"passed": result["passed"] and reg["passed"], "checks": checks,
            "best_artifact": _best(evaluation["artifacts"], bench["results"], checks),
            "regression": {k: reg[k] for k in ("passed", "warnings", "baseline")}}


def _best(arts: dict, measured: dict, checks: list[dict]) -> str | None:
    """The fastest artifact that passes all its checks; else the most accurate one."""
    failing = {c["artifact"] for c in checks if not c["passed"]}
    ok = [n for n in arts if n not in failing and n in measured]
    if ok:
        return min(ok, key=lambda n: measured[n]["latency_ms"]["p50"])
    return max(arts, key=lambda n: arts[n]["accuracy"]) if arts else None


class GateStage(Stage):
    name = "gate"
    deps = ("evaluate",)
    optional_deps = ("benchmark", "arm_instructions")
    description = "check the budget"

    def config(self, cfg):
        return {"budget": cfg.section("budget")}

    def run(self, ctx: StageContext) -> dict:
        bench = dict(ctx.input_data("benchmark")) if ctx.has_input("benchmark") else {}
        bench["arm_instructions"] = ctx.input_data("arm_instructions").get("results", {})
        result = evaluate_budget(ctx.cfg.budget, ctx.input_data("evaluate"), bench)
        for c in result["checks"]:
            ctx.log(format_check(c))
        ctx.log(f"gate {'PASSED' if result['passed'] else 'FAILED'}; best artifact: {result['best_artifact']}")
        return result
