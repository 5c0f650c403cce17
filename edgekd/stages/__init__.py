"""The pipeline's stages, in the order they run. Each file holds one stage."""

from edgekd.stages.benchmark import BenchmarkStage
from edgekd.stages.data import DataStage
from edgekd.stages.distill import DistillStage
from edgekd.stages.evaluate import EvaluateStage
from edgekd.stages.export_onnx import ExportOnnxStage
from edgekd.stages.export_tflite import ExportTFLiteStage
from edgekd.stages.gate import GateStage
from edgekd.stages.quantize import QuantizeStage
from edgekd.stages.report import ReportStage
from edgekd.stages.teacher import TeacherStage


def all_stages():
    return [DataStage(), TeacherStage(), DistillStage(), ExportOnnxStage(), QuantizeStage(), ExportTFLiteStage(),
            EvaluateStage(), BenchmarkStage(), GateStage(), ReportStage()]

