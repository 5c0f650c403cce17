"""Architectures by name. Every model takes (N, C, H, W) float inputs in [0, 1] and returns (N, classes) logits.

The input normalization is the model's first layer, so an exported file is self-contained: the app feeds
pixels scaled to [0, 1], exactly what the evaluation feeds.
"""

from __future__ import annotations


import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std on (N, C, H, W): one value for every channel (0-d buffers, the layout of existing state
    dicts) or one per channel ((C, 1, 1) buffers)."""

    def __init__(self, mean: float | list[float], std: float | list[float]):
        super().__init__()
        self.register_buffer("mean", _per_channel(mean))
        self.register_buffer("std", _per_channel(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _per_channel(value: float | list[float]) -> torch.Tensor:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    return torch.tensor(values[0]) if len(values) == 1 else torch.tensor(values).reshape(-1, 1, 1)


ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU}


def _conv_bn(cin: int, cout: int, activation: str = "relu") -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         ACTIVATIONS[activation]())


class CNN(nn.Module):
    """conv-bn-relu blocks with 2x2 max-pooling after each, then a hidden dense layer and the classifier.

    `features` and `classifier` are named so feature/attention KD and pruning can pick layers by path.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, channels=(32, 64), hidden: int = 256,
                 dropout: float = 0.25, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise TypeError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        c, h, w = input_shape
        blocks: list[nn.Module] = []
        for cout in channels:
            blocks += [_conv_bn(c, cout, activation), nn.MaxPool2d(2) if min(h, w) >= 2 else nn.Identity()]
            if min(h, w) >= 2:
                h, w = h // 2, w // 2
            c = cout
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(nn.Linear(c * h * w, hidden), ACTIVATIONS[activation](), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.flatten(self.features(x))))


class MLP(nn.Module):
    """Flatten, then ReLU hidden layers (Hinton et al.'s 800-800 student by default)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden=(800, 800), dropout: float = 0.0):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = [nn.Flatten()]
        width = c * h * w
        for units in hidden:
            layers += [nn.Linear(width, units), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = units
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DepthwiseCNN(nn.Module):
    """MobileNet-style student: a stem conv, then depthwise-separable blocks, global pooling, classifier."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, channels=(16, 32, 64)):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = [_conv_bn(c, channels[0])]
        c = channels[0]
        for cout in channels[1:]:
            layers += [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


# name -> (class, preset keyword arguments); pipeline `args` override the presets.
ARCHITECTURES: dict[str, tuple[type[nn.Module], dict]] = {
    "cnn-teacher": (CNN, {"channels": (32, 64), "hidden": 1024}),
    "cnn-small": (CNN, {"channels": (16, 32), "hidden": 64, "dropout": 0.1}),
    "cnn": (CNN, {}),
    "mlp": (MLP, {}),
    "depthwise-cnn": (DepthwiseCNN, {}),
}


def check_args(arch: str, args: dict) -> str | None:
    """The problem with `args` for `arch` (an unknown keyword, with a suggestion), or None."""
    import difflib
    import inspect

    cls = ARCHITECTURES[arch][0]
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "input_shape", "num_classes")]
    for key in args:
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1, cutoff=0.6)
            return (f"unknown argument {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; {arch} takes {', '.join(params)}")
    return None


def build_model(arch: str, args: dict, input_shape: tuple[int, int, int], num_classes: int,
                mean: float | list[float] = 0.0, std: float | list[float] = 1.0) -> nn.Sequential:
    """A model = Normalize(mean, std) followed by the named architecture. Shapes: (N,C,H,W) -> (N, classes).
    mean, std: one value, or one per input channel."""
    from edgekd.errors import ConfigError

    for key, value in (("mean", mean), ("std", std)):
        n = len(value) if isinstance(value, (list, tuple)) else 1
        if n not in (1, input_shape[0]):
            raise ConfigError(f"normalize.{key}: {n} values for {input_shape[0]}-channel images; give one value, "
                              f"or one per channel")
    try:
        cls, preset = ARCHITECTURES[arch]
        body = cls(tuple(input_shape), num_classes, **{**preset, **{k: _tuple(v) for k, v in args.items()}})
    except TypeError as exc:
        raise ConfigError(f"architecture {arch!r}: bad args {args}: {exc}") from None
    return nn.Sequential(Normalize(mean, std), body)


def count_params(model: nn.Module) -> int:
    # + weights that live outside torch (an ONNX teacher's initializers)
    return sum(p.numel() for p in model.parameters()) + sum(getattr(m, "external_params", 0) for m in model.modules())


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


def model_from_config(mcfg, input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """Build the model a pipeline section (teacher or student) describes, from whichever source it names."""
    from edgekd.models.sources import load_model  # sources builds on this module

    return load_model(mcfg, input_shape, num_classes)
