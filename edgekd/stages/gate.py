"""gate: check the budget (accuracy drop vs teacher, accuracy, latency, size, memory) per artifact."""

from edgekd.pipeline.engine import Stage, StageContext


def evaluate_budget(budget, evaluation: dict, bench: dict | None) -> dict:
    """Pure function of stored results -> {"passed", "checks": [{name, artifact, value, limit, passed}], "best"}."""
    teacher_acc = evaluation["teacher"]["accuracy"]
    arts = evaluation.get("artifacts", {})
    measured = (bench or {}).get("results", {})
    names = budget.artifacts if budget.artifacts is not None else sorted(arts)
    checks: list[dict] = []

    def add(name: str, artifact: str | None, value, limit, ok: bool, note: str = "") -> None:
        checks.append({"name": name, "artifact": artifact, "value": value, "limit": limit, "passed": bool(ok),
                       **({"note": note} if note else {})})

    for req in budget.required_artifacts:
        add(f"present[{req}]", req, 1.0 if req in arts else 0.0, 1.0, req in arts,
            "" if req in arts else "artifact missing (its stage failed or is disabled)")
    for name in names:
        if name not in arts:
            continue
        acc = arts[name]["accuracy"]
        if budget.max_accuracy_drop is not None:
            drop = teacher_acc - acc
            add(f"accuracy_drop[{name}]", name, drop, budget.max_accuracy_drop, drop <= budget.max_accuracy_drop)
        if budget.max_relative_accuracy_drop is not None:
            rel = (teacher_acc - acc) / teacher_acc if teacher_acc else 0.0
            add(f"relative_accuracy_drop[{name}]", name, rel, budget.max_relative_accuracy_drop,
                rel <= budget.max_relative_accuracy_drop)
        if budget.min_accuracy is not None:
            add(f"accuracy[{name}]", name, acc, budget.min_accuracy, acc >= budget.min_accuracy)
        if budget.max_params_ratio_vs_teacher is not None:
            ratio = evaluation["student_params"] / evaluation["teacher"]["params"]
            add(f"params_ratio_vs_teacher[{name}]", name, ratio, budget.max_params_ratio_vs_teacher,
                ratio <= budget.max_params_ratio_vs_teacher)
        m = measured.get(name)
        if budget.max_latency_ratio_vs_teacher is not None:
            ref = measured.get("teacher_fp32.onnx")
            if m is None or ref is None:
                add(f"latency_ratio_vs_teacher[{name}]", name, None, budget.max_latency_ratio_vs_teacher, False,
                    "not measured (benchmark.include_teacher must be on)")
            else:
                ratio = m["latency_ms"]["p50"] / ref["latency_ms"]["p50"]
                add(f"latency_ratio_vs_teacher[{name}]", name, ratio, budget.max_latency_ratio_vs_teacher,
                    ratio <= budget.max_latency_ratio_vs_teacher, "p50 / teacher fp32 ONNX p50, same host and run")
        for key, limit, value in (
                ("latency_p50_ms", budget.max_latency_p50_ms, m and m["latency_ms"]["p50"]),
                ("latency_p90_ms", budget.max_latency_p90_ms, m and m["latency_ms"]["p90"]),
                ("size_bytes", budget.max_size_bytes, m and m["size_bytes"]),
                ("peak_rss_bytes", budget.max_peak_rss_bytes, m and m["peak_rss_bytes"])):
            if limit is None:
                continue
            if value is None:
                add(f"{key}[{name}]", name, None, limit, False, "not measured")
            else:
                add(f"{key}[{name}]", name, float(value), limit, value <= limit)
    passed = all(c["passed"] for c in checks)
    return {"passed": passed, "checks": checks, "best_artifact": _best(arts, measured, checks)}


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
    optional_deps = ("benchmark",)
    description = "check the budget"

    def config(self, cfg):
        return {"budget": cfg.section("budget")}

    def run(self, ctx: StageContext) -> dict:
        bench = ctx.input_data("benchmark") if ctx.has_input("benchmark") else None
        result = evaluate_budget(ctx.cfg.budget, ctx.input_data("evaluate"), bench)
        for c in result["checks"]:
            value = "n/a" if c["value"] is None else f"{c['value']:.4g}"
            ctx.log(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {value} (limit {c['limit']:.4g})")
        ctx.log(f"gate {'PASSED' if result['passed'] else 'FAILED'}; best artifact: {result['best_artifact']}")
        return result
