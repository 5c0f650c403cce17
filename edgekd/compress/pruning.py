"""Structured channel pruning (torch-pruning's dependency graph) and the safe way to store a pruned model.

Channels are removed for real (smaller Conv/Linear/BatchNorm tensors), so dense runtimes get the speed-up;
the dependency graph keeps coupled layers consistent (a conv's output channels, its BatchNorm, the next layer's
input channels, a depthwise conv's groups, the flattened features of the first dense layer). The classifier is
never pruned: the model keeps its classes.

A pruned model no longer matches the architecture its config describes. It is stored as a state dict plus a
small JSON of per-layer shapes (`layer_shapes`); `rebuild` makes the architecture from the config, resizes
those layers, and then the state dict loads with `weights_only=True`: no pickled modules anywhere.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from edgekd.errors import StageError

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


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs per image, parameters) for `model` on one image of `example`'s shape."""
    import torch_pruning as tp

    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model.eval(), example[:1])
    model.train(was_training)
    return int(macs), int(params)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> Conv2d / Linear layer whose output channels may be pruned (the classifier excluded)."""
    keep = protected_layer(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not keep}


def resolve_layer_ratios(model: nn.Module, layer_ratios: dict[str, float]) -> dict[nn.Module, float]:
    """{layer path: ratio} -> {module: ratio}. A path may omit the model's leading wrapper indices ("features.0.0"
    matches "1.features.0.0"); it must name exactly one prunable layer, else StageError listing them."""
    layers = prunable_layers(model)
    out: dict[nn.Module, float] = {}
    for key, r in layer_ratios.items():
        hits = [n for n in layers if n == key or n.endswith("." + key)]
        if len(hits) != 1:
            raise StageError("prune", f"layer_ratios: {key!r} {'matches no' if not hits else 'matches more than one'} "
                                      f"prunable layer (prunable: {', '.join(layers)})")
        out[layers[hits[0]]] = r
    return out


def prune_channels(model: nn.Module, example: torch.Tensor, ratio: float, importance: str = "l2",
                   global_pruning: bool = False, layer_ratios: Optional[dict[str, float]] = None,
                   round_to: Optional[int] = None) -> nn.Module:
    """Remove `ratio` of the channels of every prunable layer in place (classifier protected); returns `model`.

    `layer_ratios` ({layer path: ratio}) overrides the ratio for single layers (a layer keeps int(C * (1 - ratio))
    of its C output channels; its BatchNorm and the next layer's inputs follow). `round_to` makes every pruned
    layer keep a multiple of that many channels (torch-pruning rounds the kept count down, and leaves a layer whole
    when rounding would empty it).
    """
    import torch_pruning as tp

    per_layer = resolve_layer_ratios(model, layer_ratios or {})
    if ratio <= 0 and not any(r > 0 for r in per_layer.values()):
        return model
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, example[:1], importance=tp.importance.GroupMagnitudeImportance(p=1 if importance == "l1" else 2),
        pruning_ratio=ratio, pruning_ratio_dict=per_layer or None, global_pruning=global_pruning,
        round_to=round_to, ignored_layers=[protected_layer(model)])
    pruner.step()
    return model


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


def layer_shapes(model: nn.Module) -> dict[str, dict]:
    """Per-layer channel counts of Conv2d / Linear / BatchNorm2d layers, by module path (a small JSON)."""
    shapes: dict[str, dict] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            shapes[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.BatchNorm2d):
            shapes[name] = {"type": "BatchNorm2d", "out": m.num_features}
    return shapes


def rebuild(model: nn.Module, shapes: dict[str, dict]) -> nn.Module:
    """Resize `model`'s layers (a fresh instance of the unpruned architecture) to `shapes`, in place.

    Every other hyper-parameter (kernel, stride, padding, bias, eps...) is taken from the original layer.
    Raises ValueError when `shapes` does not describe this architecture.
    """
    modules = dict(model.named_modules())
    own = layer_shapes(model)
    if set(own) != set(shapes):
        raise ValueError(f"the stored layer shapes do not fit this architecture (layers differ: "
                         f"{sorted(set(own) ^ set(shapes))[:3]})")
    for name, s in shapes.items():
        old = modules[name]
        if own[name]["type"] != s["type"]:
            raise ValueError(f"layer {name}: stored type {s['type']} but the architecture has {own[name]['type']}")
        if isinstance(old, nn.Conv2d):
            new = nn.Conv2d(s["in"], s["out"], old.kernel_size, old.stride, old.padding, old.dilation, s["groups"],
                            old.bias is not None, old.padding_mode)
        elif isinstance(old, nn.Linear):
            new = nn.Linear(s["in"], s["out"], old.bias is not None)
        else:
            new = nn.BatchNorm2d(s["out"], old.eps, old.momentum, old.affine, old.track_running_stats)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
    return model


def load_pruned(model: nn.Module, shapes: dict[str, dict], state_path) -> nn.Module:
    """`model` (fresh, unpruned architecture) resized to `shapes` with the pruned weights at `state_path`."""
    rebuild(model, shapes)
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    return model.eval()


def summary_of_layers(before: dict[str, dict], after: dict[str, dict]) -> dict[str, str]:
    """'in->out' channel changes per layer, for the log and the report."""
    out: dict[str, str] = {}
    for name, b in before.items():
        a: Optional[dict] = after.get(name)
        if a is not None and (a.get("in"), a["out"]) != (b.get("in"), b["out"]):
            outs = f"{b['out']}->{a['out']}" if a["out"] != b["out"] else f"{b['out']} (kept)"
            ins = f", in {b['in']}->{a['in']}" if "in" in b and b["in"] != a["in"] else ""
            out[name] = f"{b['type']} out {outs}{ins}"
    return out
