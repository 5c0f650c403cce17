"""Dataset readers and the fixed train / validation / test split.

Images are stored compactly and read as float32 (N, C, H, W) scaled to [0, 1] a batch at a time (`ImageArray`):
datasets of 8-bit pixels (idx files, uint8 npz, image folders) stay uint8 in memory and in the data stage's
`splits.npz`, so a split of 20,000 RGB 96x96 images takes 553 MB there, not 2.2 GB of float32. Labels are int64
(N,). Splits are drawn with a seeded permutation so the same pipeline always sees the same split; an image folder
is listed first and each split decoded straight into its own array (the dataset is never held twice).
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from edgekd.config import DataConfig
from edgekd.errors import DataError

DEFAULT_PATHS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_float(x: np.ndarray) -> np.ndarray:
    """Stored images as float32 in [0, 1]: uint8 (any shape) is divided by 255, float32 is returned as is."""
    return x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x


class ImageArray:
    """Images (N, C, H, W) stored as uint8 (pixel values 0..255) or float32 ([0, 1]) and read as float32 in [0, 1].

    Indexing converts only the rows asked for: `x[i:j]`, `x[idx]` give float32 arrays as the float array this
    stands for would, so batch-wise users (training, prediction, calibration) never hold a split as float.
    `np.asarray(x)` converts all of it (for callers that need one array). `.data` is the stored array.
    """

    def __init__(self, data: np.ndarray):
        self.data = data if data.dtype in (np.uint8, np.float32) else data.astype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)  # what reading it gives

    @property
    def storage_dtype(self) -> np.dtype:
        return self.data.dtype

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx) -> np.ndarray:
        return to_float(self.data[idx])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = to_float(self.data)
        return out if dtype is None else out.astype(dtype, copy=False)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive float32 batches (B, C, H, W)."""
        for i in range(0, len(self.data), batch_size):
            yield self[i:i + batch_size]

    def __repr__(self) -> str:
        return f"ImageArray(shape={self.shape}, stored as {self.data.dtype})"


@dataclass
class Splits:
    """The fixed split. x_*: ImageArray (N, C, H, W), read as float32 in [0, 1]; y_*: int64 (N,)."""

    x_train: ImageArray
    y_train: np.ndarray
    x_val: ImageArray
    y_val: np.ndarray
    x_test: ImageArray
    y_test: np.ndarray
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("x_train", "x_val", "x_test"):
            value = getattr(self, key)
            if not isinstance(value, ImageArray):
                setattr(self, key, ImageArray(np.asarray(value)))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def save(self, path: Path) -> None:
        """As stored (uint8 stays uint8), uncompressed. Old float32 files load too: the dtype says which."""
        arrays = {k: getattr(self, k).data if k.startswith("x_") else getattr(self, k) for k in SPLIT_KEYS}
        with open(path, "wb") as f:
            np.savez(f, classes=np.array(self.classes), **arrays)

    @classmethod
    def load(cls, path: Path) -> "Splits":
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in SPLIT_KEYS}, classes=[str(c) for c in z["classes"]])

    def summary(self) -> dict:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test),
                "input_shape": list(self.input_shape), "classes": self.classes,
                "storage_dtype": str(self.x_train.storage_dtype)}


@dataclass
class Source:
    """A dataset before the split: its labels up front, its images materialized by index.

    take(idx) -> (len(idx), C, H, W) uint8 or float32, in the order of idx. An in-memory dataset indexes its array;
    an image folder decodes just those files, so each split is decoded straight into its own array.
    """

    y: np.ndarray
    take: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, int, int]  # (C, H, W) of every image `take` returns

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, what: str) -> "Source":
        """An in-memory (N, C, H, W) array, checked (sizes match, no NaN) before anything is split."""
        _validate_arrays(x, y, what)
        return cls(y, lambda idx: x[idx], tuple(int(d) for d in x.shape[1:]))  # type: ignore[arg-type]


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


def load_idx_dataset(cfg: DataConfig, log: Callable[[str], None]):
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
    # uint8 (N, 1, H, W): read as float batch by batch
    return (Source.of(x_tr[:, None], y_tr.astype(np.int64), "training data"),
            Source.of(x_te[:, None], y_te.astype(np.int64), "test data"), classes)


def load_digits_dataset(cfg: DataConfig, log: Callable[[str], None]):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:, None] / 16.0).astype(np.float32)  # 17 grey levels: not uint8-exact, kept as float32
    return Source.of(x, d.target.astype(np.int64), "training data"), None, [str(i) for i in range(10)]


def load_npz_dataset(cfg: DataConfig, log: Callable[[str], None]):
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
    y_tr = _as_labels(arrays["y_train"], path, "y_train")
    train = Source.of(_as_nchw(arrays.pop("x_train"), path, "x_train"), y_tr, "training data")
    test = None
    if x_te is not None:
        y_te = _as_labels(y_te, path, "y_test")
        test = Source.of(_as_nchw(arrays.pop("x_test"), path, "x_test"), y_te, "test data")
    n_classes = int(max([0] + [int(y.max()) for y in (y_tr, y_te) if y is not None and len(y)])) + 1
    return train, test, classes or [str(i) for i in range(n_classes)]


def load_image_folder(cfg: DataConfig, log: Callable[[str], None]):
    """root/<class>/<image> (PNG, JPEG, BMP, GIF, WebP, TIFF). Class index = position of the sub-folder's name in
    sorted order. Channels: `data.channels`, else 1 when every image is grayscale and RGB (in that order) when not.
    Sizes: `data.image_size` (each image resized at decode time), else every image must have the first one's."""
    from PIL import Image

    if not cfg.path:
        raise DataError("data.path: required for dataset 'image-folder' (a folder with one sub-folder per class)")
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: needs one sub-folder per class (at least 2), found {len(classes)}")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(f for f in (root / name).iterdir()
                       if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not f.name.startswith("."))
        if not found:
            raise DataError(f"{root / name}: class folder without images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += found
        labels += [label] * len(found)
    # Headers only (PIL reads no pixels here): channels and sizes are settled, and a file that is not an image at
    # all is named, before anything is decoded.
    t0 = time.perf_counter()
    gray, first = True, None
    for file in files:
        mode, size = _header(file, Image)
        gray = gray and mode in GRAY_MODES
        if first is None:
            first = (file, size)
        elif not cfg.image_size and size != first[1]:
            raise DataError(f"{file}: image size {size[0]}x{size[1]} (WxH) differs from the first image's "
                            f"{first[1][0]}x{first[1][1]} ({first[0].name}); set data.image_size: [H, W] to resize")
    channels = cfg.channels or (1 if gray else 3)
    height, width = cfg.image_size or (first[1][1], first[1][0])  # type: ignore[index]
    log(f"{root}: {len(files)} images in {len(classes)} classes (headers read in {time.perf_counter() - t0:.1f} s), "
        f"decoded as {channels}x{height}x{width} uint8")

    def take(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), channels, height, width), np.uint8)
        for row, i in enumerate(idx):
            out[row] = decode_image(files[int(i)], channels, (height, width))
        return out

    return Source(np.array(labels, dtype=np.int64), take, (channels, height, width)), None, classes


def _header(file: Path, Image) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) of an image file, from its header."""
    try:
        with Image.open(file) as img:
            return img.mode, img.size
    except Exception as exc:  # noqa: BLE001 - any failure to parse a user's file is "not an image"
        raise DataError(f"{file}: not a readable image: {_one_line(exc)}") from None


def decode_image(file: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image file -> uint8 (channels, H, W), size = (H, W): EXIF orientation applied, 16-bit grey scaled to
    8 bits, converted to L / RGB / RGBA, bilinear-resized (antialiased when shrinking). A JPEG is decoded at a
    reduced scale (libjpeg's DCT scaling, still at least the target size) when much larger than the target."""
    from PIL import Image, ImageOps

    h, w = size
    try:
        with Image.open(file) as img:
            if img.format == "JPEG":
                img.draft("L" if channels == 1 else "RGB", (max(h, w), max(h, w)))  # >= the target, any orientation
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):  # 16-bit grey (PNG): 0..65535 -> 0..255
                img = img.convert("I").point(lambda v: v * (1 / 257)).convert("L")
            img = img.convert({1: "L", 3: "RGB", 4: "RGBA"}[channels])
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or unsupported: name the file, one line
        raise DataError(f"{file}: not a readable image: {_one_line(exc)}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


READERS = {"fashion-mnist": load_idx_dataset, "mnist": load_idx_dataset, "digits": load_digits_dataset,
           "npz": load_npz_dataset, "image-folder": load_image_folder}


# ------------------------------------------------------------------------------------------------ splitting

def load_splits(cfg: DataConfig, seed: int, log: Optional[Callable[[str], None]] = None) -> Splits:
    """Read the dataset named in `cfg`, validate it, and draw the fixed train / val / test split."""
    log = log or (lambda msg: None)
    train, test, classes = READERS[cfg.dataset](cfg, log)
    if cfg.labels_file:
        classes = read_labels_file(Path(cfg.labels_file))
    bad = [c for c in classes if not c.strip() or any(ch in c for ch in "\r\n")]
    if bad:  # labels.txt holds one name per line
        raise DataError(f"class name {bad[0]!r}: must be non-blank and on one line")
    _validate_labels(train.y, classes, "training data", cfg.labels_file)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train.y))
    if test is None:
        n_test = max(1, int(round(len(train.y) * cfg.test_fraction)))
        test, test_idx, perm = train, perm[:n_test], perm[n_test:]
    else:
        _validate_labels(test.y, classes, "test data", cfg.labels_file)
        if test.shape != train.shape:
            raise DataError(f"test images have shape {test.shape}, training images {train.shape}")
        test_idx = np.arange(len(test.y))
    n_val = max(1, int(round(len(perm) * cfg.val_fraction)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if cfg.train_limit:
        train_idx = train_idx[:cfg.train_limit]
    if len(train_idx) == 0:
        raise DataError("the training split is empty")
    t0 = time.perf_counter()
    parts = [(_shaped(src.take(idx), cfg), src.y[idx]) for src, idx in
             ((train, train_idx), (train, val_idx), (test, test_idx))]
    if cfg.dataset == "image-folder":
        log(f"decoded {sum(len(y) for _, y in parts)} images in {time.perf_counter() - t0:.1f} s")
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = parts
    return Splits(x_tr, y_tr, x_val, y_val, x_te, y_te, list(classes))


def _shaped(x: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """A materialized split with `data.channels` and `data.image_size` applied (image folders already decode to
    them): (M, C, H, W) -> (M, C', H', W'), same dtype, C-contiguous."""
    if cfg.channels and x.shape[1] != cfg.channels:
        if x.shape[1] != 1:
            raise DataError(f"data.channels: {cfg.channels}, but the {cfg.dataset} images have {x.shape[1]} channels "
                            f"(only a single channel is repeated)")
        x = np.repeat(x, cfg.channels, axis=1)  # grey -> (grey, grey, grey)
    if cfg.image_size and tuple(x.shape[2:]) != tuple(cfg.image_size):
        x = resize_images(x, tuple(cfg.image_size))
    return np.ascontiguousarray(x)


def resize_images(x: np.ndarray, size: tuple[int, int], chunk: int = 1024) -> np.ndarray:
    """(N, C, H, W) uint8 or float32 -> (N, C, size[0], size[1]) of the same dtype: bilinear, antialiased when
    shrinking (as PIL's resize), a chunk at a time so only the output is held whole."""
    import torch
    import torch.nn.functional as F

    out = np.empty(x.shape[:2] + tuple(size), x.dtype)
    for i in range(0, len(x), chunk):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + chunk])).float()
        r = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
        out[i:i + chunk] = r.round().clamp(0, 255).to(torch.uint8).numpy() if x.dtype == np.uint8 else r.numpy()
    return out


def read_labels_file(path: Path) -> list[str]:
    """Class names, one per line, in class-index order (blank lines at the end are ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"data.labels_file: {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.labels_file: {path}: not a readable UTF-8 text file: {_one_line(exc)}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise DataError(f"data.labels_file: {path} is empty (one class name per line)")
    for i, name in enumerate(names):
        if not name:
            raise DataError(f"data.labels_file: {path}: line {i + 1} is blank (one class name per line)")
        if name in names[:i]:
            raise DataError(f"data.labels_file: {path}: line {i + 1}: {name!r} is listed twice")
    return names


def source_fingerprint(cfg: DataConfig) -> str:
    """Content digest of the dataset's source files (so a changed file invalidates the cache)."""
    h = hashlib.sha256(cfg.dataset.encode())
    if cfg.labels_file and Path(cfg.labels_file).is_file():
        h.update(Path(cfg.labels_file).read_bytes())
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
    """(N, H, W), (N, C, H, W) or (N, H, W, C) with C in 1, 3, 4 -> (N, C, H, W); uint8 stays uint8 (0..255, read
    as /255), other numbers become float32 (taken as already in [0, 1])."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.ndim != 4:
        raise DataError(f"{path}: {key} has shape {x.shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C)")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{path}: {key} has dtype {x.dtype}; expected numbers")
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_labels(y: np.ndarray, path: Path, key: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} must be a 1-D integer array of class ids, got shape {y.shape} dtype {y.dtype}")
    return y.astype(np.int64)


def _validate_arrays(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if len(x) == 0:
        raise DataError(f"{what} is empty")
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} images but {len(y)} labels")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise DataError(f"{what}: {bad} images contain NaN or infinite values")


def _validate_labels(y: np.ndarray, classes: list[str], what: str, labels_file: Optional[str]) -> None:
    if len(y) == 0:
        raise DataError(f"{what} is empty")
    if y.min() < 0 or y.max() >= len(classes):
        names = f" (data.labels_file {labels_file} names {len(classes)})" if labels_file else ""
        raise DataError(f"{what}: labels range {y.min()}..{y.max()} but there are {len(classes)} classes{names}")
