"""arm_instructions: emulated aarch64 instructions per inference of every artifact and the teacher, on each ARM CPU
the target profile names (`emulate_cpus`).

The count is what the target's own runtime (aarch64 onnxruntime / LiteRT, single thread, batch 1) executes for one
inference, as QEMU's instruction-counting plugin sees it (edgekd/runtimes/aarch64.py, insn_count.c). It is not a
time: it ignores caches, memory and pipelines. It is exactly repeatable on any host, differs between CPU models the
way their instruction sets do (an int8 model on a core without dot-product instructions costs more), and so can
gate a regression in CI where host timings are noise.
"""

import time

from edgekd.pipeline.engine import Stage, StageContext
from edgekd.stages.artifacts import collect
from edgekd.stages.common import load_splits

LABEL = "emulated aarch64 instructions per inference (QEMU TCG, batch 1, 1 thread): a cost count, not a time"


class ArmInstructionsStage(Stage):
    name = "arm_instructions"
    deps = ("data", "export_onnx")
    optional_deps = ("quantize", "export_tflite", "quantize_tflite", "qat")
    uses_target = True
    description = "emulated aarch64 instructions per inference on the target's CPUs"

    def config(self, cfg):
        bench = cfg.benchmark
        return {"arm_instructions": bench.arm_instructions, "include_teacher": bench.include_teacher} \
            if bench.arm_instructions else None

    def run(self, ctx: StageContext) -> dict:
        target = ctx.target
        if not target.emulate_cpus:
            ctx.log(f"target {target.name} names no ARM CPU to emulate (emulate_cpus): nothing to count")
            return {"cpus": [], "results": {}, "note": f"target {target.name} names no emulate_cpus"}
        from edgekd.runtimes import aarch64

        env = aarch64.ensure_env(ctx.log)
        models = [(a.name, str(a.path), a.runtime) for a in collect(ctx) if a.runtime in target.runtimes]
        if ctx.cfg.benchmark.include_teacher:
            models.append(("teacher_fp32.onnx", str(ctx.input_path("export_onnx", "teacher_fp32.onnx")),
                           "onnxruntime"))
        x1 = load_splits(ctx).x_test[:1]
        t0 = time.perf_counter()
        counts = aarch64.count_instructions(env, list(target.emulate_cpus), [(p, r) for _, p, r in models], x1)
        results = {name: counts[path] for name, path, _ in models}
        for name, per_cpu in results.items():
            ctx.log(f"{name:22s} " + "  ".join(f"{cpu} {n:,}" for cpu, n in per_cpu.items()) + " instructions")
        return {"cpus": list(target.emulate_cpus), "results": results, "label": LABEL,
                "cpu_descriptions": {c: aarch64.CPUS[c][2] for c in target.emulate_cpus},
                "emulator": aarch64.describe(env, target.emulate_cpus[0])["emulator"],
                "runtime_versions": {k: env.versions[k] for k in ("onnxruntime", "ai-edge-litert")},
                "seconds": round(time.perf_counter() - t0, 1)}
