"""Quantization-aware training with torchao's PT2E flow, and the int8 files it ends in.

The route (see ../shared/STACK.md "Quantization"; eager/FX fake-quant models do not export cleanly):

    torch.export(model.train()) -> prepare_qat_pt2e(quantizer) -> allow_exported_model_train_eval
    -> an ordinary training loop (edgekd.distill.trainer.train, KD loss on)
    -> move_exported_model_to_eval -> convert_pt2e -> torch.onnx.export(dynamo=True)

gives a QDQ ONNX with BatchNorm folded, which onnxruntime fuses into integer kernels (QLinearConv, QGemm).

TFLite: a QDQ ONNX fed to onnx2tf converts to a silently wrong model, so `clamped_float_model` rewrites the QDQ
graph into the float model the QAT network computes: weights dequantized from their trained int8 values (BN
folded), and each activation quantize/dequantize pair replaced by a Clip to the QAT-learned range
[(qmin - zp) * scale, (qmax - zp) * scale]. TF's converter then quantizes that float model: the per-channel
symmetric weights land back on the QAT grid (max |w| / 127 is the trained scale), and the calibrated
activation ranges are the clamped ones. The result is parity-checked against the QAT ONNX by the caller.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def _quiet():
    """torchao prints CUDA-kernel load failures and deprecation warnings on import/use; keep the build log clean."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def make_quantizer(activation_type: str = "int8", per_channel: bool = True, reduce_range: bool = False):
    """The PT2E QAT quantizer for a target's scheme.

    Weights: symmetric int8 (per output channel when `per_channel`; [-127, 127], or [-64, 63] with
    `reduce_range` like onnxruntime's U8S8 guidance for x86 without VNNI). Activations: affine per-tensor int8
    (S8S8: ARM, x86 with VNNI) or uint8 (U8S8). Annotation of conv(+relu), linear, add and pooling is
    XNNPACKQuantizer's (torchao.testing.pt2e; the same class ships in executorch).
    """
    with _quiet():
        from torchao.quantization.pt2e import (FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver,
                                               MovingAveragePerChannelMinMaxObserver)
        from torchao.quantization.pt2e.quantizer import QuantizationSpec
        from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer
        from torchao.testing.pt2e._xnnpack_quantizer_utils import QuantizationConfig

    act_dtype, act_min, act_max = (torch.int8, -128, 127) if activation_type == "int8" else (torch.uint8, 0, 255)
    act = QuantizationSpec(dtype=act_dtype, quant_min=act_min, quant_max=act_max, qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(eps=2 ** -12))
    w_max = 63 if reduce_range else 127
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-w_max, quant_max=w_max, ch_axis=0,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
            eps=2 ** -12,
            observer=MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver))
    with _quiet():
        return XNNPACKQuantizer().set_global(QuantizationConfig(act, act, weight, None, True))


DROP_CLASSES = ("StochasticDepth", "DropPath", "DropBlock2d")  # torchvision's and timm's, matched by class name


class NoDropout(nn.Identity):
    """Identity that still answers `.p` (timm's Attention reads `self.attn_drop.p` for its fused kernel)."""

    p = 0.0
    drop_prob = 0.0


def without_dropout(model: nn.Module) -> int:
    """Replace every Dropout (and stochastic depth / drop path / drop block) by Identity in place, and set timm's
    functional head dropout (`drop_rate`) to 0; returns how many. torchao 0.18's move_exported_model_to_train /
    _eval (what .train() / .eval() do on an exported model) rewrite every dropout to p=0.5 whatever its p was, so
    a Dropout(0.0) or (0.1) would train at 0.5; and a stochastic depth exported in train mode stays random in the
    converted model (its RandomUniform ends up in the int8 ONNX). QAT is a short fine-tune; all of these are the
    identity at inference."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ in DROP_CLASSES]
    modules = dict(model.named_modules())
    for name, _ in found:
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, NoDropout())
    heads = 0
    for m in model.modules():
        rate = getattr(m, "drop_rate", None)
        if isinstance(rate, float) and rate > 0:
            m.drop_rate = 0.0
            heads += 1
    return len(found) + heads


def prepare_qat(model: nn.Module, example: np.ndarray, quantizer) -> torch.fx.GraphModule:
    """Export `model` (train mode, dynamic batch; its Dropout layers removed, see `without_dropout`) and insert
    fake-quant; the result trains like a module."""
    without_dropout(model)
    with _quiet():
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        x = torch.from_numpy(np.ascontiguousarray(example[:4]))
        batch = torch.export.Dim("batch", min=1, max=65536)
        try:
            gm = torch.export.export(model.train(), (x,), dynamic_shapes=({0: batch},)).module()
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types; one line naming the cause
            raise ValueError(f"torch.export of the student in train mode failed: {type(exc).__name__}: "
                             f"{_first(exc)}") from None
        prepared = prepare_qat_pt2e(gm, quantizer)
        allow_exported_model_train_eval(prepared)  # else .train() / .eval() raise
    return prepared


def _first(exc: BaseException) -> str:
    from edgekd.errors import first_line

    return first_line(exc)


def unshare_dequantize(model) -> int:
    """Give every extra consumer of a shared activation Q -> DQ pair its own pair, in place (onnx.ModelProto);
    returns how many pairs were added.

    A tensor read by two layers (a block input read by a conv and by the residual add, an SE block's input) leaves
    the exporter as one QuantizeLinear -> DequantizeLinear feeding both. onnxruntime then cannot fuse the conv into
    QLinearConv and runs it in float (seen on resnet18, mobilenet_v2/v3, efficientnet, ghostnet). Plain copies do
    not help: onnxruntime's common-subexpression elimination merges identical nodes back. So each copy carries a
    different `axis` attribute, which a per-tensor (scalar scale) Q/DQ ignores: the same arithmetic, nodes that are
    no longer identical. Measured on resnet18: 11 of 20 convs float before, 0 after, logits unchanged.

    Left float: a conv whose own output is read by two layers (a linear bottleneck's output read by the residual add
    and the next block) now feeds two Q nodes, which onnxruntime does not fuse; sharing the pair instead keeps both
    that conv and its readers float (measured on mobilenet_v2: 15 float convs as exported, 10 with only those pairs
    shared, 5 with every pair split)."""
    from onnx import helper

    g = model.graph
    inits = {i.name for i in g.initializer}
    rank = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in (*g.value_info, *g.input, *g.output)}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    extra: dict[int, list] = {}
    added = 0
    for dq in list(g.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] in inits or dq.output[0] in graph_outputs:
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[1] not in inits or len(dq.input) < 2:
            continue
        users = consumers.get(dq.output[0], [])
        if len(users) < 2:
            continue
        r = rank.get(q.input[0]) or 4
        axes = [a for a in range(-r, r) if a != 1] or [0]
        for j, user in enumerate(users[1:], start=1):
            axis = axes[(j - 1) % len(axes)]
            q2 = helper.make_node("QuantizeLinear", list(q.input), [f"{q.output[0]}__q{j}"],
                                  name=f"{q.name or q.output[0]}__q{j}", axis=axis)
            dq2 = helper.make_node("DequantizeLinear", [q2.output[0], *dq.input[1:]], [f"{dq.output[0]}__dq{j}"],
                                   name=f"{dq.name or dq.output[0]}__dq{j}", axis=axis)
            extra.setdefault(id(dq), []).extend([q2, dq2])
            for k, inp in enumerate(user.input):
                if inp == dq.output[0]:
                    user.input[k] = dq2.output[0]
                    break
            added += 1
    if added:
        nodes = []
        for n in g.node:
            nodes.append(n)
            nodes.extend(extra.get(id(n), []))
        del g.node[:]
        g.node.extend(nodes)
    return added


def float_weight_kernels(path, work_dir) -> tuple[list[str], list[str]]:
    """What onnxruntime runs in float after its graph optimizations: (Conv/Gemm/MatMul nodes whose weight is a
    constant, i.e. layers that should be integer; activation x activation MatMuls, e.g. attention scores, which
    the quantizer leaves in float by design), as 'op name' strings."""
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(Path(work_dir) / (Path(path).stem + ".float-check.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    g = onnx.load(so.optimized_model_filepath).graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def constant(name: str) -> bool:
        seen = 0
        while name not in inits and seen < 8:
            node = producer.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "Transpose", "Reshape", "Cast", "Constant"):
                return node is not None and node.op_type == "Constant"
            if node.op_type == "Constant":
                return True
            name, seen = node.input[0], seen + 1
        return name in inits

    weights, activations = [], []
    for n in g.node:
        if n.op_type in ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NchwcConv"):
            (weights if len(n.input) > 1 and constant(n.input[1]) else activations).append(f"{n.op_type} {n.name}")
    return weights, activations


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The trained fake-quant model -> the quantized reference model (BN folded, int8 weights, Q/DQ ops)."""
    with _quiet():
        from torchao.quantization.pt2e import allow_exported_model_train_eval, move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        move_exported_model_to_eval(prepared)
        converted = convert_pt2e(prepared)
        allow_exported_model_train_eval(converted)  # predict_logits() calls .eval()
    return converted


def fake_quant_ranges(prepared: nn.Module) -> int:
    """How many fake-quantize modules the prepared model has (a model with none would not be QAT at all)."""
    return sum(1 for m in prepared.modules() if type(m).__name__.endswith("FakeQuantize"))


# ------------------------------------------------------------------------------------------------ TFLite route

def _dequantize(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return ((values.astype(np.float32) - zero_point.astype(np.float32)) * scale.astype(np.float32)).astype(np.float32)


def clamped_float_model(qdq):
    """A QDQ onnx.ModelProto -> the float model it computes, with every activation clamped to its int8 range.

    Constant Q/DQ chains (weights) become float initializers holding the dequantized trained values; each
    activation QuantizeLinear -> DequantizeLinear pair becomes Clip(x, (qmin - zp) * s, (qmax - zp) * s).
    Returns (model, number of clamps). Raises ValueError on Q/DQ patterns it does not know.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in g.node for o in n.output}

    def attr_axis(node) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    new_inits, replace, drop, clamps = [], {}, set(), 0
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        src = n.input[0]
        scale = consts[n.input[1]]
        zp = consts[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros_like(scale, dtype=np.int8)
        if src in consts:  # int8 weight initializer -> float weight
            new_inits.append(numpy_helper.from_array(_dequantize(consts[src], scale, zp, attr_axis(n)), n.output[0]))
            drop.add(id(n))
            continue
        q = producer.get(src)
        if q is None or q.op_type != "QuantizeLinear":
            raise ValueError(f"DequantizeLinear {n.name!r} is fed by {q.op_type if q else 'a graph input'}")
        info = np.iinfo(zp.dtype)
        if q.input[0] in consts:  # float constant quantized in the graph -> its dequantized value
            qs = consts[q.input[1]]
            qz = consts[q.input[2]] if len(q.input) > 2 and q.input[2] else np.zeros_like(qs, dtype=zp.dtype)
            axis = attr_axis(q)
            shape = [1] * consts[q.input[0]].ndim
            if qs.ndim == 1 and qs.size > 1:
                shape[axis] = -1
            ints = np.clip(np.round(consts[q.input[0]] / qs.reshape(shape)) + qz.reshape(shape), info.min, info.max)
            new_inits.append(numpy_helper.from_array(_dequantize(ints.astype(zp.dtype), scale, zp, axis),
                                                     n.output[0]))
            drop.add(id(n))
            continue
        if scale.size != 1:
            raise ValueError(f"per-channel activation quantization at {n.name!r} is not supported")
        s, z = float(scale.reshape(-1)[0]), float(zp.reshape(-1)[0])
        lo, hi = (info.min - z) * s, (info.max - z) * s
        base = f"{n.output[0]}__qat_range"
        new_inits += [numpy_helper.from_array(np.array(lo, np.float32), base + "_min"),
                      numpy_helper.from_array(np.array(hi, np.float32), base + "_max")]
        replace[id(n)] = helper.make_node("Clip", [q.input[0], base + "_min", base + "_max"], [n.output[0]],
                                          name=f"{n.name or n.output[0]}_qat_clip")
        clamps += 1
    kept = []
    for n in g.node:
        if id(n) in drop:
            continue
        kept.append(replace.get(id(n), n))
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(new_inits)
    # QuantizeLinear nodes (and Constants) nothing reads any more
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    left = sorted({n.op_type for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")})
    if left:
        raise ValueError(f"Q/DQ nodes left after the rewrite: {left}")
    onnx.checker.check_model(model)
    return model, clamps
