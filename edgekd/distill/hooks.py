"""Reading intermediate outputs of a model by module path, with forward hooks (no model surgery).

A path is a name from `model.named_modules()`: edgekd's models are nn.Sequential(Normalize, body), so the
second conv block of a CNN is `1.features.2` (print `edgekd.distill.hooks.module_paths(model)` to list them).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from edgekd.errors import ConfigError


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve(model: nn.Module, path: str, where: str) -> nn.Module:
    """The submodule at `path`; an unknown path is a ConfigError naming the closest paths."""
    modules = dict(model.named_modules())
    if path and path in modules:
        return modules[path]
    paths = module_paths(model)
    close = difflib.get_close_matches(path, paths, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    shown = ", ".join(paths[:12]) + (" ..." if len(paths) > 12 else "")
    raise ConfigError(f"{where}: no module {path!r} in the model{hint}; its module paths are: {shown}")


def penultimate_path(model: nn.Module) -> str:
    """The path of the model's last nn.Linear (the classifier): its *input* is the penultimate embedding."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("the model has no nn.Linear classifier, so it has no 'penultimate' embedding; "
                          "give a module path or 'logits'")
    return linears[-1]


class FeatureTap:
    """Records, at every forward of `model`, the output (or input) of the modules at `paths`.

    `tap.values` holds the latest tensors in the order of `paths`. Use as a context manager (or call `close`)
    so the hooks are removed before the model is saved or exported.
    """

    def __init__(self, model: nn.Module, paths: list[str], where: str, inputs: list[bool] | None = None):
        self.paths = list(paths)
        self.values: list[torch.Tensor | None] = [None] * len(self.paths)
        self._handles = []
        for i, (path, use_input) in enumerate(zip(self.paths, inputs or [False] * len(self.paths))):
            module = resolve(model, path, where)
            self._handles.append(module.register_forward_hook(self._recorder(i, use_input)))

    def _recorder(self, i: int, use_input: bool):
        def hook(module, args, output):
            value = args[0] if use_input else output
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"module {self.paths[i]!r} {'input' if use_input else 'output'} is a "
                                f"{type(value).__name__}, not a tensor")
            self.values[i] = value

        return hook

    def take(self) -> list[torch.Tensor]:
        """The recorded tensors (each set by the last forward), cleared so a stale value is never reused."""
        if any(v is None for v in self.values):
            missing = [p for p, v in zip(self.paths, self.values) if v is None]
            raise RuntimeError(f"no output recorded for {missing}: the module did not run in the forward pass")
        out, self.values = self.values, [None] * len(self.paths)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
