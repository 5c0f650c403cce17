"""Dataset readers and the fixed train / validation / test split.

Every reader returns images as float32 (N, C, H, W) scaled to [0, 1] and labels as int64 (N,). Splits are
drawn with a seeded permutation so the same pipeline always sees the same split.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekd.config import DataConfig
from edgekd.errors import DataError

DEFAULT_PATHS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


@dataclass
class Splits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, classes=np.array(self.classes), **{k: getattr(self, k) for k in SPLIT_KEYS})

    @classmethod
    def load(cls, path: Path) -> "Splits":
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in SPLIT_KEYS}, classes=[str(c) for c in z["classes"]])

    def summary(self) -> dict:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test),
                "input_shape": list(self.input_shape), "classes": self.classes}


# ------------------------------------------------------------------------------------------------ readers

def read_idx(path: Path) -> np.ndarray:
    """An idx (MNIST-format) file, optionally gzipped, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read idx file: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: idx file is truncated ({body.size} bytes of data, header says {int(np.prod(dims))})")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing {stem}[.gz]")


def load_idx_dataset(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, list[str]]:
    folder = Path(cfg.path or DEFAULT_PATHS[cfg.dataset])
    if not folder.is_dir():
        fix = ("install Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`, done by `make setup`)"
               if cfg.dataset == "fashion-mnist" else "set data.path to a folder holding the four idx files")
        raise DataError(f"{cfg.dataset} not found at {folder}: {fix}")
    x_tr = read_idx(_find_idx(folder, "train-images-idx3-ubyte"))
    y_tr = read_idx(_find_idx(folder, "train-labels-idx1-ubyte"))
    x_te = read_idx(_find_idx(folder, "t10k-images-idx3-ubyte"))
    y_te = read_idx(_find_idx(folder, "t10k-labels-idx1-ubyte"))
    classes = FASHION_CLASSES if cfg.dataset == "fashion-mnist" else [str(i) for i in range(10)]
    return (x_tr[:, None].astype(np.float32) / 255.0, y_tr.astype(np.int64),
            x_te[:, None].astype(np.float32) / 255.0, y_te.astype(np.int64), classes)


def load_digits_dataset(cfg: DataConfig):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:, None] / 16.0).astype(np.float32)
    return x, d.target.astype(np.int64), None, None, [str(i) for i in range(10)]


def load_npz_dataset(cfg: DataConfig):
    if not cfg.path:
        raise DataError("data.path: required for dataset 'npz' (a .npz file with x_train, y_train[, x_test, y_test])")
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"npz dataset not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - zip/format errors of a user file
        raise DataError(f"{path}: not a readable .npz file: {exc}") from None
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (has: {', '.join(sorted(arrays)) or 'nothing'})")
    x_te, y_te = arrays.get("x_test"), arrays.get("y_test")
    if (x_te is None) != (y_te is None):
        raise DataError(f"{path}: x_test and y_test must come together")
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    x_tr = _as_nchw(arrays["x_train"], path, "x_train")
    y_tr = _as_labels(arrays["y_train"], path, "y_train")
    if x_te is not None:
        x_te, y_te = _as_nchw(x_te, path, "x_test"), _as_labels(y_te, path, "y_test")
    n_classes = int(max([0] + [int(y.max()) for y in (y_tr, y_te) if y is not None and len(y)])) + 1
    return x_tr, y_tr, x_te, y_te, classes or [str(i) for i in range(n_classes)]


def load_image_folder(cfg: DataConfig):
    """root/<class>/<image> (PNG/JPEG/BMP); grayscale images become 1 channel, others RGB."""
    from PIL import Image, UnidentifiedImageError

    if not cfg.path:
        raise DataError("data.path: required for dataset 'image-folder' (a folder with one sub-folder per class)")
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{root}: needs one sub-folder per class (at least 2), found {len(classes)}")
    images, labels, shape = [], [], None
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".gif"}:
                continue
            try:
                img = Image.open(file)
                img.load()
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{file}: not a readable image: {exc}") from None
            img = img.convert("L") if img.mode in ("L", "1", "I;16", "I") else img.convert("RGB")
            if cfg.image_size:
                img = img.resize((cfg.image_size[1], cfg.image_size[0]))
            arr = np.asarray(img, dtype=np.float32) / 255.0
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise DataError(f"{file}: image shape {arr.shape[1:]}x{arr.shape[0]}ch differs from the first image's "
                                f"{shape[1:]}x{shape[0]}ch; set data.image_size to resize")
            images.append(arr)
            labels.append(label)
    if not images:
        raise DataError(f"{root}: no images found")
    return np.stack(images), np.array(labels, dtype=np.int64), None, None, classes


READERS = {"fashion-mnist": load_idx_dataset, "mnist": load_idx_dataset, "digits": load_digits_dataset,
           "npz": load_npz_dataset, "image-folder": load_image_folder}


# ------------------------------------------------------------------------------------------------ splitting

def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Read the dataset named in `cfg`, validate it, and draw the fixed train / val / test split."""
    x, y, x_test, y_test, classes = READERS[cfg.dataset](cfg)
    _validate(x, y, classes, "training data")
    rng = np.random.default_rng(seed)
    if x_test is None:
        perm = rng.permutation(len(y))
        n_test = max(1, int(round(len(y) * cfg.test_fraction)))
        test_idx, perm = perm[:n_test], perm[n_test:]
        x_test, y_test = x[test_idx], y[test_idx]
        x, y = x[perm], y[perm]
    else:
        _validate(x_test, y_test, classes, "test data")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"test images have shape {x_test.shape[1:]}, training images {x.shape[1:]}")
        perm = rng.permutation(len(y))
        x, y = x[perm], y[perm]
    n_val = max(1, int(round(len(y) * cfg.val_fraction)))
    x_val, y_val, x_tr, y_tr = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    if cfg.train_limit:
        x_tr, y_tr = x_tr[:cfg.train_limit], y_tr[:cfg.train_limit]
    if len(y_tr) == 0:
        raise DataError("the training split is empty")
    return Splits(np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_val), y_val,
                  np.ascontiguousarray(x_test), y_test, list(classes))


def source_fingerprint(cfg: DataConfig) -> str:
    """Content digest of the dataset's source files (so a changed file invalidates the cache)."""
    h = hashlib.sha256(cfg.dataset.encode())
    if cfg.dataset == "digits":
        import sklearn

        h.update(sklearn.__version__.encode())
        return h.hexdigest()
    path = Path(cfg.path or DEFAULT_PATHS.get(cfg.dataset, ""))
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _as_nchw(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.ndim != 4:
        raise DataError(f"{path}: {key} has shape {x.shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C)")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: {key} has dtype {x.dtype}; expected numbers")
    return x.astype(np.float32)


def _as_labels(y: np.ndarray, path: Path, key: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} must be a 1-D integer array of class ids, got shape {y.shape} dtype {y.dtype}")
    return y.astype(np.int64)


def _validate(x: np.ndarray, y: np.ndarray, classes: list[str], what: str) -> None:
    if len(x) == 0:
        raise DataError(f"{what} is empty")
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} images but {len(y)} labels")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise DataError(f"{what}: {bad} images contain NaN or infinite values")
    if y.min() < 0 or y.max() >= len(classes):
        raise DataError(f"{what}: labels range {y.min()}..{y.max()} but there are {len(classes)} classes")
