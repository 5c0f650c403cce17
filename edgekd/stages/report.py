"""report: assemble the report object (report.json's content) from every stage's stored results."""

from edgekd.pipeline.engine import Stage, StageContext
from edgekd.reports.build import build_report


class ReportStage(Stage):
    name = "report"
    deps = ("data", "teacher", "distill", "evaluate")
    optional_deps = ("assistant", "prune", "qat", "export_onnx", "quantize", "export_tflite", "quantize_tflite",
                     "benchmark", "arm_instructions", "gate")
    uses_target = True
    description = "assemble the report"

    def config(self, cfg):
        return {"pipeline": cfg.digest()}

    def run(self, ctx: StageContext) -> dict:
        return build_report(ctx)
