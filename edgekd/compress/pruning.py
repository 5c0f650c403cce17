"""Structured channel pruning (torch-pruning's dependency graph) and the safe way to store a pruned model.

Channels are removed for real (smaller Conv/Linear/BatchNorm/LayerNorm tensors), so dense runtimes get the speed-up;
the dependency graph keeps coupled layers consistent (a conv's output channels, its BatchNorm, the next layer's
input channels, a depthwise conv's groups, a squeeze-excitation block's reduce/expand layers and the channels it
scales, the flattened features of the first dense layer).

Layers whose output channels are never pruned (`protected_layers`):
- the classifier: the model keeps its classes;
- every Conv/Linear inside an attention block (a module with `num_heads`, an `nn.MultiheadAttention`, or a class
  named *Attention): the qkv projection is reshaped into heads, and the output projection writes the residual
  stream that position embeddings and class tokens share, so heads, head size and the embedding width are kept.
  A transformer's MLP hidden layers are still pruned.

A pruned model no longer matches the architecture its config describes. It is stored as a state dict plus a
small JSON of per-layer shapes (`layer_shapes`: every module holding parameters or buffers, with the channel
attributes torch-pruning changes); `rebuild` makes the architecture from the config and resizes those modules in
place (their class, and so their forward, is kept: timm's BatchNormAct2d, Conv2dSame, LayerNorm2d...), and then
the state dict loads with `weights_only=True`: no pickled modules anywhere.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn

from edgekd.errors import StageError, first_line


def protected_layer(model: nn.Module) -> nn.Module:
    """The classifier: the module named `classifier` (every zoo architecture has one), else the last Linear."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "classifier":
            return module
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise StageError("prune", "cannot find the classifier layer to protect (no module named 'classifier', "
                                  "no Linear layer)")
    return linears[-1]


def is_attention(module: nn.Module) -> bool:
    """An attention block: nn.MultiheadAttention, a module with a `num_heads` attribute and weights (timm's
    Attention, torchvision's and most hand-written ones), or a class named *Attention / *SelfAttention."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    has_weights = any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())
    return has_weights and (isinstance(getattr(module, "num_heads", None), int)
                            or type(module).__name__.endswith("Attention"))


def protected_layers(model: nn.Module) -> dict[str, str]:
    """Module path -> why its output channels are never pruned (the classifier; layers of attention blocks)."""
    keep = protected_layer(model)
    out = {name: "classifier" for name, m in model.named_modules() if m is keep}
    blocks = [name for name, m in model.named_modules() if name and is_attention(m)]
    outer = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks if o != b)]
    modules = dict(model.named_modules())
    for block in outer:
        what = f"attention block {block} ({type(modules[block]).__name__})"
        if isinstance(modules[block], nn.MultiheadAttention):
            out.setdefault(block, what)
        for sub, m in modules[block].named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                out.setdefault(f"{block}.{sub}" if sub else block, what)
    return out


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs per image, parameters) for `model` on one image of `example`'s shape."""
    import torch_pruning as tp

    was_training = model.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs, params = tp.utils.count_ops_and_params(model.eval(), example[:1])
    model.train(was_training)
    return int(macs), int(params)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> Conv2d / Linear layer whose output channels may be pruned (protected layers excluded)."""
    keep = protected_layers(model)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in keep}


def resolve_layer_ratios(model: nn.Module, layer_ratios: dict[str, float]) -> dict[nn.Module, float]:
    """{layer path: ratio} -> {module: ratio}. A path may omit the model's leading wrapper indices ("features.0.0"
    matches "1.features.0.0"); it must name exactly one prunable layer, else StageError listing them."""
    layers = prunable_layers(model)
    out: dict[nn.Module, float] = {}
    for key, r in layer_ratios.items():
        hits = [n for n in layers if n == key or n.endswith("." + key)]
        if len(hits) != 1:
            shown = ", ".join(list(layers)[:40]) + (" ..." if len(layers) > 40 else "")
            raise StageError("prune", f"layer_ratios: {key!r} {'matches no' if not hits else 'matches more than one'} "
                                      f"prunable layer (prunable: {shown})")
        out[layers[hits[0]]] = r
    return out


def prune_channels(model: nn.Module, example: torch.Tensor, ratio: float, importance: str = "l2",
                   global_pruning: bool = False, layer_ratios: Optional[dict[str, float]] = None,
                   round_to: Optional[int] = None) -> nn.Module:
    """Remove `ratio` of the channels of every prunable layer in place (protected layers keep theirs); returns
    `model`.

    `layer_ratios` ({layer path: ratio}) overrides the ratio for single layers (a layer keeps int(C * (1 - ratio))
    of its C output channels; its BatchNorm and the next layer's inputs follow). `round_to` makes every pruned
    layer keep a multiple of that many channels (torch-pruning rounds the kept count down, and leaves a layer whole
    when rounding would empty it).

    Raises StageError naming the op or layer when torch-pruning cannot follow the model's channels (e.g. a channel
    shuffle's 5-D view) or when the pruned model no longer runs.
    """
    import torch_pruning as tp

    per_layer = resolve_layer_ratios(model, layer_ratios or {})
    if ratio <= 0 and not any(r > 0 for r in per_layer.values()):
        return model
    model.eval()
    modules = dict(model.named_modules())
    ignored = [modules[name] for name in protected_layers(model)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning warns about class tokens / position embeddings it leaves
        try:
            pruner = tp.pruner.MetaPruner(
                model, example[:1], importance=tp.importance.GroupMagnitudeImportance(p=1 if importance == "l1" else 2),
                pruning_ratio=ratio, pruning_ratio_dict=per_layer or None, global_pruning=global_pruning,
                round_to=round_to, ignored_layers=ignored)
        except Exception as exc:  # noqa: BLE001 - torch-pruning's tracer fails in many ways; name where
            raise StageError("prune", f"torch-pruning cannot follow the channels of this model: "
                                      f"{_graph_failure(exc, model)}") from None
        try:
            pruner.step()
        except Exception as exc:  # noqa: BLE001
            raise StageError("prune", f"torch-pruning failed while removing channels: {type(exc).__name__}: "
                                      f"{first_line(exc)}") from None
    check_runs(model, example[:2], "the pruned model")
    return model


def _graph_failure(exc: BaseException, model: nn.Module) -> str:
    """Where torch-pruning's dependency graph broke: the op (a reshape, split...) and the nearest named layer
    before it, read from the failing frame's graph node; else the exception's first line."""
    names = {id(m): n for n, m in model.named_modules()}
    node = None
    tb = exc.__traceback__
    while tb is not None:  # innermost frame holding a torch-pruning graph node
        for var in ("reshape_node", "node"):
            value = tb.tb_frame.f_locals.get(var)
            if value is not None and hasattr(value, "inputs") and hasattr(value, "grad_fn"):
                node = value
        tb = tb.tb_next
    what = f"{type(exc).__name__}: {first_line(exc)}"
    if node is None:
        return what
    op = type(node.grad_fn).__name__ if node.grad_fn is not None else type(node.module).__name__
    seen, queue = set(), list(node.inputs)
    while queue:
        cur = queue.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if id(cur.module) in names and names[id(cur.module)]:
            layer = names[id(cur.module)]
            return (f"op {op} after layer {layer} ({type(cur.module).__name__}) "
                    f"(e.g. a channel shuffle or a reshape of channels) ({what})")
        queue.extend(cur.inputs)
    return f"op {op} ({what})"


def failing_module(model: nn.Module, x: torch.Tensor) -> Optional[tuple[str, BaseException]]:
    """Run `model` on x; None when it runs, else (the innermost module whose forward raised, the exception)."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []  # modules whose forward started and has not returned: the last one raised
    handles = []

    def pre(m, args):
        stack.append(names.get(id(m), "?"))

    def post(m, args, out):
        stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            model.eval()(x)
        return None
    except Exception as exc:  # noqa: BLE001
        return (stack[-1] if stack else "") or "(the model)", exc
    finally:
        for h in handles:
            h.remove()


def check_runs(model: nn.Module, x: torch.Tensor, what: str) -> None:
    """StageError naming the layer when `model` no longer runs on x."""
    failed = failing_module(model, x)
    if failed is not None:
        name, exc = failed
        layer = dict(model.named_modules()).get(name)
        kind = f" ({type(layer).__name__})" if layer is not None else ""
        raise StageError("prune", f"{what} fails in layer {name}{kind}: {type(exc).__name__}: {first_line(exc)}")


def ratio_for_macs(model: nn.Module, example: torch.Tensor, target_macs: int, importance: str = "l2",
                   global_pruning: bool = False, steps: int = 8, layer_ratios: Optional[dict[str, float]] = None,
                   round_to: Optional[int] = None) -> float:
    """The smallest pruning ratio whose pruned copy of `model` has at most `target_macs` MACs.

    A coarse scan (ratio 0.05, 0.10, ... 0.95) finds the first ratio that fits, then bisection refines it. No plain
    bisection over [0, 1): at high ratios torch-pruning leaves a layer whole rather than remove all its channels,
    so MACs are not monotonic in the ratio there.
    """
    def macs_at(ratio: float) -> int:
        pruned = prune_channels(copy.deepcopy(model), example, ratio, importance, global_pruning, layer_ratios,
                                round_to)
        return count_macs_params(pruned, example)[0]

    macs0, _ = count_macs_params(model, example)
    if macs0 <= target_macs:
        return 0.0
    hi = next((i / 20 for i in range(1, 20) if macs_at(i / 20) <= target_macs), None)
    if hi is None:
        raise StageError("prune", f"target_macs {target_macs:,} is out of reach: no pruning ratio up to 0.95 gets "
                                  f"there (the student has {macs0:,}); raise target_macs or shrink the student")
    lo = hi - 0.05
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs_at(mid) <= target_macs else (mid, hi)
    return hi


# Attributes torch-pruning changes when it resizes a module (recorded for modules of other classes than the plain
# Conv2d / Linear / BatchNorm2d, whose entries keep their compact form).
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "normalized_shape", "num_groups", "num_channels", "embed_dim", "kdim", "vdim", "num_heads", "head_dim")


def _own_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in (*m._parameters.items(), *m._buffers.items()) if v is not None}


def layer_shapes(model: nn.Module) -> dict[str, dict]:
    """Per-module shapes of every module that holds parameters or buffers, by module path (a small JSON).

    Plain Conv2d / Linear / BatchNorm2d: {"type", "in", "out"(, "groups")}; any other module (a BatchNorm or Conv
    subclass, LayerNorm, GroupNorm, a module with its own tensors such as a class token or layer scale):
    {"type": class name, "tensors": {name: shape}, "attrs": {channel attributes}}."""
    shapes: dict[str, dict] = {}
    for name, m in model.named_modules():
        own = _own_tensors(m)
        if not own:
            continue
        if type(m) is nn.Conv2d:
            shapes[name] = {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif type(m) is nn.Linear:
            shapes[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features}
        elif type(m) is nn.BatchNorm2d:
            shapes[name] = {"type": "BatchNorm2d", "out": m.num_features}
        else:
            attrs = {}
            for a in SHAPE_ATTRS:
                v = getattr(m, a, None)
                if isinstance(v, bool):
                    continue
                if isinstance(v, int) or (isinstance(v, (tuple, list)) and all(isinstance(i, int) for i in v)):
                    attrs[a] = list(v) if isinstance(v, (tuple, list)) else v
            shapes[name] = {"type": type(m).__name__, "tensors": {k: list(v.shape) for k, v in own.items()},
                            "attrs": attrs}
    return shapes


def _resize(m: nn.Module, name: str, shape) -> None:
    """Replace m's parameter or buffer `name` by an uninitialised tensor of `shape` (the state dict fills it)."""
    old = m._parameters.get(name)
    if old is not None:
        m._parameters[name] = nn.Parameter(torch.empty(tuple(shape), dtype=old.dtype), requires_grad=old.requires_grad)
    else:
        buf = m._buffers[name]
        m._buffers[name] = torch.zeros(tuple(shape), dtype=buf.dtype)


def rebuild(model: nn.Module, shapes: dict[str, dict]) -> nn.Module:
    """Resize `model`'s layers (a fresh instance of the unpruned architecture) to `shapes`, in place.

    Each module keeps its class and every other hyper-parameter (kernel, stride, padding, eps, its activation...);
    only its tensors and channel attributes change. Raises ValueError naming the layer when `shapes` does not
    describe this architecture."""
    modules = dict(model.named_modules())
    own = layer_shapes(model)
    if set(own) != set(shapes):
        raise ValueError(f"the stored layer shapes do not fit this architecture (layers differ: "
                         f"{sorted(set(own) ^ set(shapes))[:3]})")
    for name, s in shapes.items():
        m = modules[name]
        if own[name]["type"] != s["type"]:
            raise ValueError(f"layer {name}: stored type {s['type']} but the architecture has {own[name]['type']}")
        if "tensors" not in s:  # plain Conv2d / Linear / BatchNorm2d
            if isinstance(m, nn.Conv2d):
                m.in_channels, m.out_channels, m.groups = s["in"], s["out"], s["groups"]
                _resize(m, "weight", (s["out"], s["in"] // s["groups"], *m.kernel_size))
                if m.bias is not None:
                    _resize(m, "bias", (s["out"],))
            elif isinstance(m, nn.Linear):
                m.in_features, m.out_features = s["in"], s["out"]
                _resize(m, "weight", (s["out"], s["in"]))
                if m.bias is not None:
                    _resize(m, "bias", (s["out"],))
            else:
                m.num_features = s["out"]
                for t in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, t, None) is not None:
                        _resize(m, t, (s["out"],))
            continue
        mine = _own_tensors(m)
        if set(mine) != set(s["tensors"]):
            raise ValueError(f"layer {name} ({s['type']}): stored tensors {sorted(s['tensors'])} but the "
                             f"architecture has {sorted(mine)}")
        for a, v in s.get("attrs", {}).items():
            if not hasattr(m, a):
                raise ValueError(f"layer {name} ({s['type']}) has no attribute {a!r} to resize")
            current = getattr(m, a)
            setattr(m, a, tuple(v) if isinstance(current, (tuple, list)) else v)
        for t, shape in s["tensors"].items():
            if list(mine[t].shape) != list(shape):
                _resize(m, t, shape)
    return model


def load_pruned(model: nn.Module, shapes: dict[str, dict], state_path) -> nn.Module:
    """`model` (fresh, unpruned architecture) resized to `shapes` with the pruned weights at `state_path`."""
    rebuild(model, shapes)
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    return model.eval()


def first_difference(a: nn.Module, b: nn.Module, x: torch.Tensor, rtol: float = 1e-4) -> Optional[str]:
    """The first module (in execution order) whose output differs between two models of the same structure on x,
    beyond rtol of the output's range; None when every tensor output agrees."""
    outs: dict[str, list] = {"a": [], "b": []}
    handles = []
    for key, model in (("a", a), ("b", b)):
        for name, m in model.named_modules():
            if name:
                handles.append(m.register_forward_hook(
                    lambda mod, args, out, key=key, name=name: outs[key].append((name, out))))
    try:
        with torch.no_grad():
            a.eval()(x)
            b.eval()(x)
    finally:
        for h in handles:
            h.remove()
    for (name, oa), (_, ob) in zip(outs["a"], outs["b"]):
        if isinstance(oa, torch.Tensor) and isinstance(ob, torch.Tensor):
            if oa.shape != ob.shape:
                return f"{name} (output shape {tuple(oa.shape)} vs {tuple(ob.shape)} reloaded)"
            scale = float(oa.abs().max()) or 1.0
            if float((oa - ob).abs().max()) > rtol * scale:
                return f"{name} ({type(dict(a.named_modules())[name]).__name__})"
    return None


def summary_of_layers(before: dict[str, dict], after: dict[str, dict]) -> dict[str, str]:
    """'in->out' channel changes per layer, for the log and the report."""
    out: dict[str, str] = {}
    for name, b in before.items():
        a: Optional[dict] = after.get(name)
        if a is None:
            continue
        if "tensors" in b:  # another module type: its tensors' shapes
            if a.get("tensors") != b["tensors"]:
                changed = [f"{t} {'x'.join(map(str, b['tensors'][t]))}->{'x'.join(map(str, a['tensors'].get(t, [])))}"
                           for t in b["tensors"] if a["tensors"].get(t) != b["tensors"][t]]
                out[name] = f"{b['type']} {', '.join(changed)}"
            continue
        if (a.get("in"), a["out"]) != (b.get("in"), b["out"]):
            outs = f"{b['out']}->{a['out']}" if a["out"] != b["out"] else f"{b['out']} (kept)"
            ins = f", in {b['in']}->{a['in']}" if "in" in b and b["in"] != a["in"] else ""
            out[name] = f"{b['type']} out {outs}{ins}"
    return out
