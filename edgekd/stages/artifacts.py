"""The artifact list: every deployable model the upstream stages produced, with where it lives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgekd.pipeline.engine import StageContext

ARTIFACT_STAGES = ("export_onnx", "quantize", "export_tflite", "quantize_tflite", "qat")


@dataclass
class Artifact:
    name: str
    format: str  # onnx | tflite
    precision: str  # fp32 | fp16 | int8
    path: Path  # absolute
    rel_path: str  # relative to the run dir
    stage: str
    converter: dict | None = None  # TFLite files: the route that made it, versions, seconds, tried routes, ops

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.format == "onnx" else "tflite"


def collect(ctx: StageContext) -> list[Artifact]:
    found = []
    for stage in ARTIFACT_STAGES:
        for a in ctx.input_data(stage).get("artifacts", []):
            found.append(Artifact(a["name"], a["format"], a["precision"], ctx.input_path(stage, a["file"]),
                                  ctx.inputs[stage].files[a["file"]], stage, a.get("converter")))
    return found
