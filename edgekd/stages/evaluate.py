"""evaluate: accuracy of the teacher and of every artifact in its own runtime on the held-out test split."""

import time

from edgekd.distill.trainer import accuracy, predict_logits
from edgekd.models.zoo import count_params
from edgekd.pipeline.engine import Stage, StageContext
from edgekd.runtimes.ort_runner import OrtRunner
from edgekd.stages.artifacts import collect
from edgekd.stages.common import load_splits, load_student, load_teacher


class EvaluateStage(Stage):
    name = "evaluate"
    deps = ("data", "teacher", "distill", "export_onnx")
    optional_deps = ("prune", "quantize", "export_tflite", "quantize_tflite", "qat")
    description = "accuracy on the test split, in each artifact's runtime"

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
        results = {}
        for art in collect(ctx):
            t0 = time.perf_counter()
            if art.runtime == "onnxruntime":
                logits = OrtRunner(art.path, threads=2).predict(x, ctx.cfg.evaluate.batch_size)
            else:
                from edgekd.runtimes.tflite_runner import TFLiteRunner

                logits = TFLiteRunner(art.path, num_threads=2).predict(x, ctx.cfg.evaluate.batch_size)
            acc = accuracy(logits, y)
            agree = float((logits.argmax(1) == teacher_top1).mean())
            results[art.name] = {"accuracy": acc, "teacher_agreement": agree, "runtime": art.runtime,
                                 "samples": int(len(y)), "seconds": time.perf_counter() - t0}
            ctx.log(f"{art.name:22s} {art.runtime:12s} accuracy {acc:.4f}  agreement with teacher {agree:.4f}")
        return {"teacher": {"accuracy": teacher_acc, "runtime": "torch", "samples": int(len(y)),
                            "params": count_params(teacher)},
                "student_torch_accuracy": student_torch, "student_params": count_params(student),
                "artifacts": results}
