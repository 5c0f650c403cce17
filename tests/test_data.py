"""Dataset readers on real files written in their real formats, and bad data refused before training."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from edgekd.config import DataConfig
from edgekd.data.datasets import load_splits, read_idx
from edgekd.errors import DataError


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _idx_folder(tmp_path, n_train=120, n_test=40):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return tmp_path


def test_idx_reader_and_split(tmp_path):
    folder = _idx_folder(tmp_path)
    s = load_splits(DataConfig(dataset="mnist", path=str(folder), val_fraction=0.25), seed=0)
    assert s.x_train.shape == (90, 1, 28, 28) and s.x_val.shape == (30, 1, 28, 28) and s.x_test.shape[0] == 40
    # stored as the file's uint8, read as float32 in [0, 1] a batch at a time
    assert s.x_train.storage_dtype == np.uint8 and s.x_train[:5].dtype == np.float32
    assert np.array_equal(s.x_train[:5], s.x_train.data[:5].astype(np.float32) / 255)
    assert 0.0 <= s.x_train[:].min() and s.x_train[:].max() <= 1.0
    # the split is fixed by the seed
    again = load_splits(DataConfig(dataset="mnist", path=str(folder), val_fraction=0.25), seed=0)
    assert np.array_equal(s.x_val, again.x_val)
    assert read_idx(folder / "train-labels-idx1-ubyte").shape == (120,)


def test_real_fashion_mnist():
    """The default pipeline's dataset; `make test` installs it (Makefile `dataset`), so it must be there."""
    s = load_splits(DataConfig(dataset="fashion-mnist", train_limit=1000), seed=0)
    assert s.x_test.shape == (10000, 1, 28, 28) and len(s.y_train) == 1000 and s.num_classes == 10


def test_digits():
    s = load_splits(DataConfig(dataset="digits"), seed=0)
    assert s.input_shape == (1, 8, 8) and len(s.y_train) + len(s.y_val) + len(s.y_test) == 1797


def test_npz_nhwc_uint8(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 256, (50, 6, 6, 3), dtype=np.uint8), y_train=rng.integers(0, 3, 50),
             x_test=rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8), y_test=rng.integers(0, 3, 10))
    s = load_splits(DataConfig(dataset="npz", path=str(path)), seed=0)
    assert s.input_shape == (3, 6, 6) and s.num_classes == 3 and s.x_train.storage_dtype == np.uint8
    assert s.x_train[:].max() <= 1.0


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    s = load_splits(DataConfig(dataset="image-folder", path=str(tmp_path), test_fraction=0.25, val_fraction=0.2),
                    seed=0)
    assert s.classes == ["cat", "dog"] and s.input_shape == (1, 10, 12)
    Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).save(tmp_path / "dog" / "odd.png")
    with pytest.raises(DataError, match="differs from the first image"):
        load_splits(DataConfig(dataset="image-folder", path=str(tmp_path)), seed=0)


@pytest.mark.parametrize("arrays, needle", [
    ({"x_train": np.full((10, 4, 4), np.nan, np.float32), "y_train": np.zeros(10, np.int64)}, "NaN"),
    ({"x_train": np.zeros((0, 4, 4), np.float32), "y_train": np.zeros(0, np.int64)}, "empty"),
    ({"x_train": np.zeros((10, 4, 4), np.float32), "y_train": np.zeros(9, np.int64)}, "10 images but 9 labels"),
    ({"x_train": np.zeros((10, 4), np.float32), "y_train": np.zeros(10, np.int64)}, "expected (N, H, W)"),
    ({"x_train": np.zeros((10, 4, 4), np.float32)}, "missing array 'y_train'"),
    ({"x_train": np.zeros((10, 4, 4), np.float32), "y_train": np.zeros(10, np.float32)}, "integer array"),
    ({"x_train": np.zeros((10, 4, 4), np.float32), "y_train": np.full(10, -1)}, "labels range"),
])
def test_bad_npz(tmp_path, arrays, needle):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(dataset="npz", path=str(path)), seed=0)
    assert needle in str(err.value)


def test_missing_and_truncated(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_splits(DataConfig(dataset="fashion-mnist", path=str(tmp_path / "none")), seed=0)
    folder = _idx_folder(tmp_path)
    raw = (folder / "train-labels-idx1-ubyte").read_bytes()
    (folder / "train-labels-idx1-ubyte").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_splits(DataConfig(dataset="mnist", path=str(folder)), seed=0)
