"""onnxruntime on the CPU execution provider: batch prediction and a bare timed call for benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def optimized_op_types(path: str | Path, work_dir: str | Path, disabled_optimizers: list[str] | None = None
                       ) -> list[str]:
    """The op types onnxruntime actually runs after its graph optimizations (ORT_ENABLE_ALL, CPU, minus
    `disabled_optimizers`), read back from the optimized graph it writes out: shows whether a QDQ model runs integer
    kernels (QLinearConv, QGemm...), or which layout a host measurement ran."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(Path(work_dir) / (Path(path).stem + ".ort-optimized.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                         **({"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}))
    return sorted({n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node})


class OrtRunner:
    def __init__(self, path: str | Path, threads: int = 1, providers: list | None = None,
                 optimization: str = "all", profile_prefix: str | None = None,
                 disabled_optimizers: list[str] | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                       "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        # disabled_optimizers: e.g. an ARM target's missing x86 NCHWc layout (TargetProfile.host_disabled_optimizers)
        self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"],
                                            **({"disabled_optimizers": list(disabled_optimizers)}
                                               if disabled_optimizers else {}))
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, x_nchw: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """x (N, C, H, W) float32 -> logits (N, K) float32."""
        outs = [self.session.run(None, {self.input_name: np.ascontiguousarray(x_nchw[i:i + batch_size])})[0]
                for i in range(0, len(x_nchw), batch_size)]
        return np.concatenate(outs).astype(np.float32)

    def prepare(self, x_nchw: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x_nchw, dtype=np.float32)

    def run_raw(self, x: np.ndarray):
        return self.session.run(None, {self.input_name: x})
