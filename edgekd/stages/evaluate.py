"""evaluate: accuracy of the teacher and of every artifact in its own runtime on the held-out test split.

For a target whose profile names `emulate_cpus` (an ARM CPU), an artifact's accuracy is the one the target's own
arithmetic gives: the aarch64 builds of onnxruntime and LiteRT run the file under emulation on the first named CPU
(edgekd/runtimes/aarch64.py). The host's figure is kept beside it (`host_accuracy`), with the number of images on
which host and target top-1 disagree: x86 int8 kernels without VNNI compute S8S8 models differently from ARM, so a
host figure is never passed off as the target's.
"""

import time

import numpy as np

from edgekd.distill.trainer import accuracy, predict_logits
from edgekd.models.zoo import count_params
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.runtimes.ort_runner import OrtRunner
from edgekd.stages.artifacts import collect
from edgekd.stages.common import load_splits, load_student, load_teacher
from edgekd.targets.profiles import cpu_model


class EvaluateStage(Stage):
    name = "evaluate"
    deps = ("data", "teacher", "distill", "export_onnx")
    optional_deps = ("prune", "quantize", "export_tflite", "quantize_tflite", "qat")
    uses_target = True  # the profile's emulated CPU decides the accuracy
    description = "accuracy on the test split, in each artifact's runtime (the target's arithmetic where emulated)"

    def config(self, cfg):
        return {"evaluate": cfg.section("evaluate")}

    def run(self, ctx: StageContext) -> dict:
        splits = load_splits(ctx)
        x, y = splits.x_test, splits.y_test
        teacher, student = load_teacher(ctx, splits), load_student(ctx, splits)
        teacher_logits = predict_logits(teacher, x)
        teacher_top1 = teacher_logits.argmax(1)
        teacher_acc = accuracy(teacher_logits, y)
        student_torch = accuracy(predict_logits(student, x), y)
        ctx.log(f"test split: {len(y)} images; teacher (torch) accuracy {teacher_acc:.4f}, "
                f"student (torch) {student_torch:.4f}")
        host_label = f"host {cpu_model()}"
        results = {}
        arts = collect(ctx)
        for art in arts:
            t0 = time.perf_counter()
            if art.runtime == "onnxruntime":
                logits = OrtRunner(art.path, threads=2).predict(x, ctx.cfg.evaluate.batch_size)
            else:
                from edgekd.runtimes.tflite_runner import TFLiteRunner

                logits = TFLiteRunner(art.path, num_threads=2).predict(x, ctx.cfg.evaluate.batch_size)
            acc = accuracy(logits, y)
            agree = float((logits.argmax(1) == teacher_top1).mean())
            results[art.name] = {"accuracy": acc, "teacher_agreement": agree, "runtime": art.runtime,
                                 "samples": int(len(y)), "seconds": time.perf_counter() - t0,
                                 "accuracy_measured_on": {"architecture": "x86_64 host", "cpu": host_label,
                                                          "runtime": art.runtime},
                                 "host_top1": logits.argmax(1)}
            ctx.log(f"{art.name:22s} {art.runtime:12s} accuracy {acc:.4f}  agreement with teacher {agree:.4f}  (host)")
        cpu = _target_cpu(ctx.target, ctx.cfg)
        caveat = _host_arithmetic_caveat(ctx) if cpu is None else None
        if caveat:
            for art in arts:
                if art.format == "onnx" and art.precision == "int8":
                    results[art.name]["accuracy_measured_on"]["caveat"] = caveat
                    ctx.log(f"warning: {art.name}: {caveat}")
        target = None
        if cpu is not None and arts:
            target = self.on_target(ctx, cpu, arts, x, y, teacher_top1, results)
        for r in results.values():
            r.pop("host_top1")
        return {"teacher": {"accuracy": teacher_acc, "runtime": "torch", "samples": int(len(y)),
                            "params": count_params(teacher)},
                "student_torch_accuracy": student_torch, "student_params": count_params(student),
                "artifacts": results, "target_arithmetic": target}

    def on_target(self, ctx: StageContext, cpu: str, arts, x, y, teacher_top1, results: dict) -> dict:
        """Each artifact's accuracy from the aarch64 runtimes on the emulated `cpu`; the host figures move to
        host_accuracy. Returns the summary of the emulated evaluation."""
        from edgekd.runtimes import aarch64

        env = aarch64.ensure_env(ctx.log)
        limit = ctx.cfg.evaluate.target_samples
        idx = np.arange(len(y)) if limit is None or limit >= len(y) else \
            np.sort(np.random.default_rng(ctx.cfg.seed).choice(len(y), size=limit, replace=False))
        xs, ys = x[idx], y[idx]
        ctx.log(f"target arithmetic: {len(arts)} artifacts on {len(ys)} test images with the aarch64 runtimes "
                f"on an emulated {cpu} ({aarch64.CPUS[cpu][2]})")
        t0 = time.perf_counter()
        out = aarch64.predict(env, cpu, [(str(a.path), a.runtime) for a in arts], xs, ctx.cfg.evaluate.batch_size)
        where = aarch64.describe(env, cpu)
        for art in arts:
            r, got = results[art.name], out[str(art.path)]
            top1 = got["logits"].argmax(1)
            host_top1 = r["host_top1"][idx]
            acc = float((top1 == ys).mean())
            r.update({
                "host_accuracy": r["accuracy"], "host_samples": r["samples"],
                "host_accuracy_measured_on": r["accuracy_measured_on"],
                "accuracy": acc, "samples": int(len(ys)),
                "teacher_agreement": float((top1 == teacher_top1[idx]).mean()),
                "accuracy_measured_on": {**where, "runtime": art.runtime, "runtime_version": got["runtime_version"]},
                "host_target_top1_disagreements": int((top1 != host_top1).sum()),
                "target_seconds": round(got["seconds"], 1)})
            if len(idx) < len(y):  # the drop is judged against the teacher on the same images
                r["teacher_accuracy_same_samples"] = float((teacher_top1[idx] == ys).mean())
            flag = f"  host {r['host_accuracy']:.4f}, top-1 differs on {r['host_target_top1_disagreements']} images" \
                if r["host_target_top1_disagreements"] else f"  (host {r['host_accuracy']:.4f})"
            ctx.log(f"{art.name:22s} {art.runtime:12s} accuracy {acc:.4f} on aarch64 {cpu}{flag}")
        return {**where, "samples": int(len(ys)), "of": int(len(y)), "seconds": round(time.perf_counter() - t0, 1),
                "subset_seed": ctx.cfg.seed if len(idx) < len(y) else None}


def _host_arithmetic_caveat(ctx: StageContext) -> str | None:
    """Why the host's int8 ONNX accuracy may not be the target's, when the target's arithmetic is not emulated: an
    x86 host without VNNI saturates S8S8 models that an ARM target computes exactly (README, "Judged with the
    target's arithmetic"). None where the host's figure stands."""
    import platform

    from edgekd.quantize.ptq import has_vnni, quant_scheme

    if ctx.target is None or not ctx.target.emulate_cpus or platform.machine() not in ("x86_64", "AMD64"):
        return None
    act, _, _ = quant_scheme(ctx.cfg.quantize, ctx.target.quantization)
    if act != "int8" or has_vnni():
        return None
    return (f"computed by this x86 host without VNNI, whose int8 kernels saturate S8S8 models that "
            f"{ctx.target.emulate_cpus[0]} computes exactly: the target's accuracy may be higher "
            f"(evaluate.emulate: true measures it)")


def _target_cpu(target, cfg) -> str | None:
    """The emulated CPU whose arithmetic decides accuracy, or None (host arithmetic)."""
    if target is None or not target.emulate_cpus or not cfg.evaluate.emulate:
        return None
    return target.emulate_cpus[0]
