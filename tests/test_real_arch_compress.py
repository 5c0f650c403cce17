"""Pruning (torch-pruning), QAT (torchao PT2E) and feature KD by module path on real torchvision / timm architectures.

Real models, real torch, onnxruntime on the exported files; small inputs (3x32x32) keep each test short. The fast
subset is torchvision mobilenet_v3_small and resnet18 and timm efficientnet_lite0; the others are marked slow.
"""

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgekd.compress.pruning import (count_macs_params, first_difference, layer_shapes, load_pruned,
                                     protected_layers, prune_channels, rebuild, summary_of_layers)
from edgekd.config import ModelConfig
from edgekd.errors import StageError
from edgekd.models.sources import load_model

SHAPE = (3, 32, 32)
FAST = ["torchvision:mobilenet_v3_small", "torchvision:resnet18", "timm:efficientnet_lite0"]


def _model(arch: str, shape=SHAPE, **args) -> nn.Module:
    torch.manual_seed(0)
    return load_model(ModelConfig(arch=arch, args=args), shape, 10).eval()


def _x(n=4, shape=SHAPE, seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def _prune_and_reload(arch: str, tmp_path, shape=SHAPE, ratio=0.5, **args):
    """Prune `arch` by `ratio`, store it as state dict + JSON shapes, rebuild a fresh instance and load it back."""
    model, x = _model(arch, shape, **args), _x(4, shape)
    macs0, params0 = count_macs_params(model, x)
    before = layer_shapes(model)
    prune_channels(model, x, ratio)
    macs1, params1 = count_macs_params(model, x)
    shapes = json.loads(json.dumps(layer_shapes(model)))  # what the prune stage writes: plain JSON
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp_path / "student.pt")
    reloaded = load_pruned(_model(arch, shape, **args), shapes, tmp_path / "student.pt")
    with torch.no_grad():
        ref, got = model(x), reloaded(x)
    return dict(model=model, reloaded=reloaded, ref=ref, got=got, shapes=shapes, before=before,
                macs=(macs0, macs1), params=(params0, params1), x=x)


@pytest.mark.parametrize("arch", FAST)
def test_prune_cuts_macs_and_params_and_reloads_without_pickles(arch, tmp_path):
    r = _prune_and_reload(arch, tmp_path)
    (macs0, macs1), (params0, params1) = r["macs"], r["params"]
    assert macs1 < 0.6 * macs0 and params1 < 0.6 * params0, (r["macs"], r["params"])
    assert r["ref"].shape == (4, 10)  # the classifier keeps the classes
    assert torch.equal(r["ref"], r["got"]), float((r["ref"] - r["got"]).abs().max())
    assert first_difference(r["model"], r["reloaded"], r["x"]) is None
    # every module keeps its class through rebuild (timm's BatchNormAct2d keeps its activation)
    types = {n: type(m) for n, m in r["model"].named_modules()}
    assert types == {n: type(m) for n, m in r["reloaded"].named_modules()}
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert summary_of_layers(r["before"], r["shapes"])  # the report lists changed layers


def test_depthwise_and_squeeze_excitation_stay_consistent(tmp_path):
    from torchvision.ops.misc import SqueezeExcitation

    r = _prune_and_reload("torchvision:mobilenet_v3_small", tmp_path)
    model = r["model"]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    se = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    assert se
    for m in se:  # the SE block scales the channels it reads: expand's outputs == reduce's inputs
        assert m.fc2.out_channels == m.fc1.in_channels and m.fc1.out_channels == m.fc2.in_channels
    unpruned = [m.fc1.out_channels for m in _model("torchvision:mobilenet_v3_small").modules()
                if isinstance(m, SqueezeExcitation)]
    assert any(m.fc1.out_channels < u for m, u in zip(se, unpruned))  # the squeeze width itself is pruned


def test_timm_batchnorm_act_is_resized_in_place_and_keeps_its_activation(tmp_path):
    r = _prune_and_reload("timm:efficientnet_lite0", tmp_path)
    bn = r["shapes"]["1.bn1"]
    assert bn["type"] == "BatchNormAct2d" and bn["attrs"]["num_features"] == bn["tensors"]["weight"][0]
    act = dict(r["reloaded"].named_modules())["1.bn1.act"]
    assert isinstance(act, nn.ReLU6)


def test_resnet18_residual_channels_follow_the_shortcut(tmp_path):
    r = _prune_and_reload("torchvision:resnet18", tmp_path)
    m = r["model"][1]
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        for block in layer:
            out = block.conv2.out_channels
            assert block.bn2.num_features == out
            if block.downsample is not None:
                assert block.downsample[0].out_channels == out
    assert m.fc.in_features == m.layer4[-1].conv2.out_channels and m.fc.out_features == 10


def test_layer_shapes_that_do_not_fit_are_one_clear_line(tmp_path):
    r = _prune_and_reload("timm:efficientnet_lite0", tmp_path)
    shapes = json.loads(json.dumps(r["shapes"]))
    shapes["1.bn1"]["type"] = "BatchNorm2d"
    with pytest.raises(ValueError, match=r"layer 1\.bn1: stored type BatchNorm2d but the architecture has "
                                         r"BatchNormAct2d"):
        rebuild(_model("timm:efficientnet_lite0"), shapes)
    shapes = json.loads(json.dumps(r["shapes"]))
    del shapes["1.bn1"]["tensors"]["running_var"]
    with pytest.raises(ValueError, match=r"layer 1\.bn1 \(BatchNormAct2d\): stored tensors"):
        rebuild(_model("timm:efficientnet_lite0"), shapes)
    with pytest.raises(ValueError, match="do not fit this architecture"):
        rebuild(_model("torchvision:resnet18"), r["shapes"])


def test_vit_attention_is_kept_whole_and_its_mlp_pruned(tmp_path):
    shape = (3, 32, 32)
    r = _prune_and_reload("timm:vit_tiny_patch16_224", tmp_path, shape, img_size=32)
    model = r["model"]
    kept = protected_layers(model)
    assert "1.blocks.0.attn.qkv" in kept and "1.blocks.0.attn.proj" in kept and "1.head" in kept
    block = model[1].blocks[0]
    assert block.attn.qkv.out_features == 3 * 192 and block.attn.proj.out_features == 192
    assert block.mlp.fc1.out_features == 384  # 768 -> 384
    assert torch.allclose(r["ref"], r["got"], atol=1e-5)


def test_channel_shuffle_fails_in_one_line_naming_the_layer():
    model, x = _model("torchvision:shufflenet_v2_x0_5"), _x(2)
    with pytest.raises(StageError) as err:
        prune_channels(model, x, 0.5)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("stage prune: torch-pruning cannot follow the channels")
    assert "after layer 1." in msg and "View" in msg, msg


def test_pruned_model_that_does_not_run_names_the_failing_layer():
    from edgekd.compress.pruning import check_runs

    model = _model("torchvision:resnet18")
    model[1].layer2[0].conv1 = nn.Conv2d(63, 128, 3, 2, 1, bias=False)  # a broken channel count
    with pytest.raises(StageError, match=r"fails in layer 1\.layer2\.0\.conv1 \(Conv2d\): RuntimeError"):
        check_runs(model, _x(2), "the pruned model")


# ---------------------------------------------------------------------------------------------------- QAT (PT2E)

def _qat_to_onnx(model: nn.Module, x: torch.Tensor, path, steps: int = 2, unshare: bool = True):
    from edgekd.compress.qat import convert, make_quantizer, prepare_qat, unshare_dequantize
    from edgekd.export.onnx_export import export_onnx

    prepared = prepare_qat(model, x.numpy(), make_quantizer("int8", True, False))
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    prepared.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        xb = torch.rand(8, *x.shape[1:], generator=g)
        loss = nn.functional.cross_entropy(prepared(xb), torch.randint(0, 10, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    converted = convert(prepared)
    export_onnx(converted, x.numpy(), path, opset=18, stage="qat")
    copies = 0
    if unshare:
        proto = onnx.load(str(path))
        copies = unshare_dequantize(proto)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
    return converted, copies


# measured float weight layers left in onnxruntime (3x32x32, random weights): a linear bottleneck's output read by
# the residual add and the next block keeps its conv float (unshare_dequantize's docstring)
FLOAT_LEFT = {"torchvision:mobilenet_v3_small": 5, "torchvision:resnet18": 0, "timm:efficientnet_lite0": 5}


@pytest.mark.parametrize("arch,pruned", [(FAST[0], False), (FAST[1], True),
                                         pytest.param(FAST[2], True, marks=pytest.mark.slow)])
def test_qat_int8_onnx_runs_integer_kernels(arch, pruned, tmp_path):
    from edgekd.compress.qat import float_weight_kernels
    from edgekd.runtimes.ort_runner import OrtRunner, optimized_op_types

    model, x = _model(arch), _x(8)
    if pruned:
        prune_channels(model, x, 0.5)
    path = tmp_path / "qat.onnx"
    converted, copies = _qat_to_onnx(model, x, path)
    weights, activations = float_weight_kernels(path, tmp_path)
    assert len(weights) <= FLOAT_LEFT[arch] and activations == [], (weights, activations)
    ran = optimized_op_types(path, tmp_path)
    assert {"QLinearConv", "QGemm"} <= set(ran), ran
    stored = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert not set(stored) & {"RandomUniformLike", "BatchNormalization"}
    assert stored.count("Conv") > 4 * len(weights)  # most convs are integer
    with torch.no_grad():
        ref = converted(x).numpy()
    got = OrtRunner(path, threads=2).predict(x.numpy())
    # integer kernels vs the torch reference model (random weights, 2 QAT steps: coarse ranges; the digits build in
    # tests/test_compress.py checks accuracy on trained weights)
    assert np.isfinite(got).all() and np.abs(got - ref).max() <= 0.75 * float(np.abs(ref).max()) + 1e-3
    assert copies > 0


@pytest.mark.slow
def test_shared_qdq_pairs_keep_resnet_convs_float_until_split(tmp_path):
    """Why unshare_dequantize exists: resnet18's QDQ graph as exported runs 11 of its 20 convs in float."""
    from edgekd.compress.qat import float_weight_kernels, unshare_dequantize
    from edgekd.runtimes.ort_runner import OrtRunner

    model, x = _model("torchvision:resnet18"), _x(8)
    path = tmp_path / "qat.onnx"
    _qat_to_onnx(model, x, path, steps=1, unshare=False)
    weights, _ = float_weight_kernels(path, tmp_path)
    assert len(weights) >= 5 and all(w.startswith("Conv") for w in weights), weights
    proto = onnx.load(str(path))
    assert unshare_dequantize(proto) > 0
    onnx.checker.check_model(proto)
    split = tmp_path / "split.onnx"
    onnx.save(proto, str(split))
    assert float_weight_kernels(split, tmp_path)[0] == []
    xs = _x(16, seed=3).numpy()  # the same arithmetic: per-tensor Q/DQ ignore the copies' axis attribute
    assert np.abs(OrtRunner(split).predict(xs) - OrtRunner(path).predict(xs)).max() < 1e-6


def test_without_dropout_removes_stochastic_depth_and_timm_head_dropout():
    from edgekd.compress.qat import without_dropout

    tv = _model("torchvision:efficientnet_b0")
    n = sum(1 for m in tv.modules() if type(m).__name__ in ("StochasticDepth", "Dropout"))
    assert n > 0 and without_dropout(tv) >= n
    assert not any(type(m).__name__ in ("StochasticDepth", "Dropout") for m in tv.modules())
    lite = _model("timm:efficientnet_lite0", drop_rate=0.2)  # timm's functional dropout before the classifier
    assert lite[1].drop_rate > 0 and without_dropout(lite) >= 1 and lite[1].drop_rate == 0.0
    x = _x(2)
    lite.train()
    torch.manual_seed(0)
    a = lite(x)
    torch.manual_seed(1)
    b = lite(x)
    assert torch.equal(a, b)  # nothing random left in train mode (BN uses the batch, deterministically)
    vit = _model("timm:vit_tiny_patch16_224", img_size=32, attn_drop_rate=0.1)
    without_dropout(vit)
    assert vit[1].blocks[0].attn.attn_drop.p == 0.0  # timm's fused attention reads .p
    vit.train()(x)


# ------------------------------------------------------------------------------------------ feature KD by path

def test_feature_kd_between_resnet18_and_mobilenet_v3_small_by_module_path():
    from edgekd.config import FeatureMethod, KDMethod, MethodsConfig
    from edgekd.distill.objective import FeatureObjective
    from edgekd.distill.teachers import BatchTeacher

    teacher, student = _model("torchvision:resnet18"), _model("torchvision:mobilenet_v3_small")
    methods = MethodsConfig(kd=KDMethod(), feature=FeatureMethod(pairs=[["1.layer3", "1.features.8"],
                                                                       ["1.layer4", "1.features.12"]]))
    x = _x(8)
    obj = FeatureObjective(methods, 0.7, student, BatchTeacher([teacher], [None], ["0"]), x.numpy())
    try:
        adapters = [tuple(a.weight.shape) for a in obj.feature.adapters]
        assert adapters == [(256, 48, 1, 1), (512, 576, 1, 1)]
        student.train()
        logits = student(x)
        terms = obj(logits, x)
        terms["loss"].backward()
        assert float(terms["feature"]) > 0
        assert student[1].features[8].block[0][0].weight.grad is not None  # the hint reaches the student layer
        assert obj.feature.adapters[0].weight.grad is not None
    finally:
        obj.close()
    assert all(not m._forward_hooks for m in student.modules())


def test_feature_kd_reads_vit_tokens_as_a_patch_grid():
    from edgekd.config import FeatureMethod, KDMethod, MethodsConfig
    from edgekd.distill.objective import FeatureObjective
    from edgekd.distill.teachers import BatchTeacher

    teacher = _model("torchvision:resnet18")
    student = _model("timm:vit_tiny_patch16_224", img_size=32, patch_size=8)  # 4x4 patches + class token
    methods = MethodsConfig(kd=KDMethod(), feature=FeatureMethod(pairs=[["1.layer2", "1.blocks.11"]]))
    x = _x(4)
    obj = FeatureObjective(methods, 0.7, student, BatchTeacher([teacher], [None], ["0"]), x.numpy())
    try:
        assert tuple(obj.feature.adapters[0].weight.shape) == (128, 192, 1, 1)
        terms = obj(student.train()(x), x)
        terms["loss"].backward()
        assert student[1].blocks[11].mlp.fc2.weight.grad is not None
    finally:
        obj.close()


# ---------------------------------------------------------------------------------------- slower architectures

@pytest.mark.slow
@pytest.mark.parametrize("arch,shape,args", [
    ("torchvision:mobilenet_v2", SHAPE, {}),
    ("torchvision:efficientnet_b0", SHAPE, {}),
    ("timm:ghostnet_050", SHAPE, {}),
    ("timm:vit_tiny_patch16_224", (3, 96, 96), {"img_size": 96}),
])
def test_prune_and_qat_on_more_architectures(arch, shape, args, tmp_path):
    from edgekd.compress.qat import float_weight_kernels

    r = _prune_and_reload(arch, tmp_path, shape, **args)
    assert r["params"][1] < 0.8 * r["params"][0]
    scale = max(1.0, float(r["ref"].abs().max()))
    assert float((r["ref"] - r["got"]).abs().max()) <= 1e-4 * scale
    path = tmp_path / "qat.onnx"
    _qat_to_onnx(r["model"], _x(8, shape), path, steps=1)
    weights, _ = float_weight_kernels(path, tmp_path)
    n_conv = sum(1 for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))
    assert len(weights) < n_conv, weights  # the stage's rule: most weight layers integer


@pytest.mark.slow
def test_mobilevit_transformer_is_kept_and_the_rest_pruned(tmp_path):
    shape = (3, 64, 64)
    r = _prune_and_reload("timm:mobilevit_xxs", tmp_path, shape)
    kept = protected_layers(r["model"])
    assert any(k.endswith("attn.qkv") for k in kept)
    assert r["params"][1] < 0.7 * r["params"][0]
    assert torch.allclose(r["ref"], r["got"], atol=1e-5)
