"""Checkpoints load with weights_only=True; pickles that run code are refused; wrong files get clear errors."""

import os

import pytest
import torch
from torch import nn

from edgekd.errors import CheckpointError
from edgekd.models.checkpoint import load_into, load_state_dict
from edgekd.models.zoo import build_model


class _Evil:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    assert "allow_pickle" in str(err.value) and "arbitrary code" in str(err.value)
    assert not marker.exists()


def test_state_dict_roundtrip_and_wrong_arch(tmp_path):
    model = build_model("cnn", {"channels": [4], "hidden": 8}, (1, 8, 8), 10)
    path = tmp_path / "ok.pt"
    torch.save(model.state_dict(), path)
    state = load_state_dict(path)
    other = build_model("cnn", {"channels": [4], "hidden": 8}, (1, 8, 8), 10)
    load_into(other, state, path, "cnn")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    wrong = build_model("mlp", {"hidden": [16]}, (1, 8, 8), 10)
    with pytest.raises(CheckpointError, match="not a state dict for architecture 'mlp': missing keys"):
        load_into(wrong, state, path, "mlp")
    wider = build_model("cnn", {"channels": [4], "hidden": 9}, (1, 8, 8), 10)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_into(wider, state, path, "cnn")


def test_truncated_and_garbage_files(tmp_path):
    model = build_model("cnn", {"channels": [4], "hidden": 8}, (1, 8, 8), 10)
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state_dict(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError):
        load_state_dict(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "missing.pt")


def test_module_versions_survive_save_and_load(tmp_path):
    """torchvision's MNASNet refuses a state dict without `_metadata` ("version should be set to 1 or 2"): edgekd's
    own checkpoints keep it, and a user's plain dict of tensors gets the model's versions when loaded."""
    torchvision = pytest.importorskip("torchvision")
    from edgekd.stages.common import save_state_dict

    path = tmp_path / "mnasnet.pt"
    save_state_dict(torchvision.models.mnasnet0_5(num_classes=10), path)
    state = torch.load(path, weights_only=True)
    torchvision.models.mnasnet0_5(num_classes=10).load_state_dict(state)

    plain = {k: v for k, v in state.items()}  # what a user's dict comprehension or safetensors-style file holds
    with pytest.raises(ValueError, match="version"):
        torchvision.models.mnasnet0_5(num_classes=10).load_state_dict(plain)
    wrapped = nn.Sequential(nn.Identity(), torchvision.models.mnasnet0_5(num_classes=10))
    load_into(wrapped, plain, path, "torchvision:mnasnet0_5")  # keys gain the "1." prefix, versions come along
    assert torch.equal(wrapped[1].classifier[1].weight, state["classifier.1.weight"])
