"""Safe checkpoint loading: `weights_only=True` always, unless the user explicitly opts into pickles."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from edgekd.errors import CheckpointError, first_line


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: refused: the file holds pickled Python objects beyond tensors, and loading it could run "
                f"arbitrary code ({first_line(exc)}); save a state dict instead, or set teacher.allow_pickle: true "
                f"only for a file you trust") from None
        obj = _load_pickle(path)
    except Exception as exc:  # noqa: BLE001 - zip, unpickler and storage errors all mean a damaged file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{first_line(exc)}") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


def _load_pickle(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure of an opted-in pickle is the file's fault
        raise CheckpointError(f"{path}: could not load pickled checkpoint: {first_line(exc)}") from None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, arch: str) -> None:
    """Load `state` into `model`, accepting keys with or without the Normalize prefix ("1." body)."""
    saved_versions = getattr(state, "_metadata", None)  # the dict comprehensions below drop it
    own = model.state_dict()
    prefix = ""
    if not any(k in own for k in state) and all(("1." + k) in own for k in state):
        prefix = "1."
        state = {"1." + k: v for k, v in state.items()}
    # A state dict saved without the Normalize layer keeps the pipeline's normalization buffers.
    for k in ("0.mean", "0.std"):
        if k in own and k not in state:
            state = {**state, k: own[k]}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shape_bad:
            parts.append("shape mismatch at " + _few([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                      for k in shape_bad]))
        raise CheckpointError(f"{path}: not a state dict for architecture {arch!r}: " + "; ".join(parts))
    model.load_state_dict(with_version_metadata(state, own, saved_versions, prefix))


def with_version_metadata(state: dict, own: dict, saved: dict | None = None, prefix: str = "") -> OrderedDict:
    """`state` as an OrderedDict carrying `_metadata` (per-module `version` numbers), which some modules' loaders
    require: torchvision's MNASNet refuses a state dict without it. The checkpoint's own versions win (remapped under
    `prefix`); modules it does not describe get the running model's versions."""
    out = OrderedDict(state)
    meta = OrderedDict(getattr(own, "_metadata", None) or {})
    for name, value in (saved or {}).items():
        meta[(prefix + name) if name else prefix.rstrip(".")] = value
    out._metadata = meta  # type: ignore[attr-defined]
    return out


def detached_state_dict(model: nn.Module) -> OrderedDict:
    """A copy of `model.state_dict()` that keeps `_metadata`, ready for torch.save (and weights_only loading)."""
    own = model.state_dict()
    return with_version_metadata({k: v.detach().clone() for k, v in own.items()}, own)


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
