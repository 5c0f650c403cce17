"""The architecture matrix's fast subset, kept green in the suite: the same code as `benchmarks/arch_matrix.py` (the
real CLI, one build per route) on three of its 14 architectures, smaller (3x32x32) so it fits the suite's time."""

import importlib.util
from pathlib import Path

import pytest

from edgekd.data.datasets import DEFAULT_PATHS

REPO = Path(__file__).resolve().parent.parent
FASHION = Path(DEFAULT_PATHS["fashion-mnist"]) / "train-images-idx3-ubyte.gz"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FASHION.is_file(), reason="Fashion-MNIST not installed (make dataset)")]


def _matrix():
    spec = importlib.util.spec_from_file_location("arch_matrix", REPO / "benchmarks" / "arch_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["torchvision:mobilenet_v3_small", "torchvision:resnet18", "timm:efficientnet_lite0"])
def test_matrix_row_is_green(arch, tmp_path):
    """Every artifact of the default route is built, loads, passes parity and is benchmarked: ONNX fp32 / int8 and
    litert-torch's TFLite fp32 / int8 (batch 1, static). resnet18's int8 TFLite is the file onnx2tf's route could not
    make loadable; here it must load in LiteRT with XNNPACK (the stage checks that in a fresh process)."""
    matrix = _matrix()
    rows = matrix.run_arch(arch, dict(matrix.ARCHS)[arch], tmp_path, size=32, routes=("litert-torch",), timeout=1200)
    by_name = {r["artifact"]: r for r in rows}
    assert set(by_name) == {"student_fp32.onnx", "student_int8.onnx", "student_fp32.tflite", "student_int8.tflite"}
    for name, row in by_name.items():
        assert row["outcome"] == "ok", (name, row["outcome"])
        assert row["size_kib"] > 0 and row["p50_ms"] > 0, row
    fp32 = by_name["student_fp32.tflite"]
    assert float(fp32["parity"].split()[0]) < 1e-4, fp32["parity"]  # max |diff| relative to the logit range
    assert fp32["static_batch"] == 1 and fp32["seconds"] > 0
    int8 = by_name["student_int8.tflite"]
    assert int8["quantize_ops"] >= 1 and int8["parity"].startswith("top-1 ")
    assert int8["float_ops"] < int8["total_ops"]  # an integer graph, not a float one with Q/DQ at the ends
    assert "|" in matrix.markdown(rows)
