"""The pipeline's stages, in the order they run. Each file holds one stage.

The stage modules are imported when `all_stages()` is called, not with this package, so a command that needs one
pure function (`edgekd gate` re-evaluating a stored report) does not pay for importing torch and TensorFlow.
"""


def all_stages():
    from edgekd.stages.arm_instructions import ArmInstructionsStage
    from edgekd.stages.assistant import AssistantStage
    from edgekd.stages.benchmark import BenchmarkStage
    from edgekd.stages.data import DataStage
    from edgekd.stages.distill import DistillStage
    from edgekd.stages.evaluate import EvaluateStage
    from edgekd.stages.export_onnx import ExportOnnxStage
    from edgekd.stages.export_tflite import ExportTFLiteStage
    from edgekd.stages.gate import GateStage
    from edgekd.stages.prune import PruneStage
    from edgekd.stages.qat import QATStage
    from edgekd.stages.quantize import QuantizeStage
    from edgekd.stages.quantize_tflite import QuantizeTFLiteStage
    from edgekd.stages.report import ReportStage
    from edgekd.stages.teacher import TeacherStage

    return [DataStage(), TeacherStage(), AssistantStage(), DistillStage(), PruneStage(), QATStage(), ExportOnnxStage(),
            QuantizeStage(), ExportTFLiteStage(), QuantizeTFLiteStage(), EvaluateStage(), BenchmarkStage(),
            ArmInstructionsStage(), GateStage(), ReportStage()]
