"""Datasets: sklearn digits, local MNIST/Fashion-MNIST IDX files and CIFAR-10 batches, split and normalized."""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError

__all__ = ["DATASETS", "Dataset", "load", "read_idx"]

DATASETS: tuple[str, ...] = ("digits", "digits28", "mnist", "fashion-mnist", "cifar10")
SPLITS: tuple[str, ...] = ("train", "val", "test")

_ALIASES = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist"}
_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_FILES = tuple(f"{p}-{k}" for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True, eq=False)
class Dataset:
    """Three normalized splits of one dataset.

    ``X_*`` are float32 ``(N, C, H, W)`` tensors already normalized with the per-channel ``mean``
    and ``std`` of the *train* split; ``y_*`` are int64 class indices. ``load`` memoizes and hands
    the same object to every caller, so treat the tensors as read-only (clone before changing them).

    Example:
        >>> ds = load("digits")
        >>> ds.input_shape, ds.num_classes
        ((1, 8, 8), 10)
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one example."""
        c, h, w = self.X_train.shape[1:]
        return (c, h, w)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def sizes(self) -> dict[str, int]:
        """Number of examples per split, e.g. ``{"train": 1257, "val": 180, "test": 360}``."""
        return {s: len(self.split(s)[1]) for s in SPLITS}

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(X, y)`` of the split ``"train"``, ``"val"`` or ``"test"``.

        Example:
            >>> X, y = load("digits").split("val")
        """
        if name not in SPLITS:
            raise WorkbenchError(f"unknown split {name!r}; expected one of: {', '.join(SPLITS)}")
        return getattr(self, f"X_{name}"), getattr(self, f"y_{name}")

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 hex digest of the name, seed, classes and every byte of the six tensors.

        Example:
            >>> load("digits", seed=0).fingerprint == load("digits", seed=1).fingerprint
            False
        """
        h = hashlib.sha256(f"{self.name}\0{self.seed}\0{self.classes}\0".encode())
        for s in SPLITS:
            for t in self.split(s):
                h.update(f"{s}:{t.dtype}:{tuple(t.shape)}\0".encode())
                h.update(t.contiguous().numpy())
        return h.hexdigest()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={n}" for s, n in self.sizes.items())
        shape, n = self.input_shape, self.num_classes
        return f"Dataset({self.name!r}, input_shape={shape}, classes={n}, {sizes}, seed={self.seed})"


def load(name: str = "digits", root: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """Load a dataset, split it train/val/test (stratified, seeded) and normalize it.

    ``digits``/``digits28`` come with scikit-learn. The others are read from local files and never
    downloaded: ``root`` is the folder holding the files or its parent; ``None`` means
    ``$WORKBENCH_DATA/<name>``, else ``~/.cache/workbench/data/<name>``. Results are memoized per
    (name, folder, seed): repeated calls return the same object, whose tensors must not be modified.

    Args:
        name: One of ``DATASETS`` (case-insensitive; ``fashion_mnist`` works too).
        root: Where the files of ``mnist``, ``fashion-mnist`` or ``cifar10`` are; ignored for digits.
        seed: Integer >= 0 that fixes the split.

    Returns:
        The :class:`Dataset`.

    Raises:
        WorkbenchError: Unknown name, bad seed, missing or malformed files.

    Example:
        >>> ds = load("digits", seed=0)
        >>> ds.sizes
        {'train': 1257, 'val': 180, 'test': 360}
    """
    key = _canonical(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise WorkbenchError(f"seed must be an integer >= 0, got {seed!r}")
    folder = "" if key in ("digits", "digits28") else str(_find_folder(key, root))
    return _load_cached(key, folder, int(seed))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzipped), strictly checking its header and length.

    Args:
        path: The file; gzip is recognised by a ``.gz`` suffix or by its magic bytes.

    Returns:
        A native-endian numpy array with the shape stored in the header.

    Raises:
        WorkbenchError: Unreadable, not IDX, truncated or with trailing bytes.

    Example:
        >>> images = read_idx("train-images-idx3-ubyte.gz")  # doctest: +SKIP
        >>> images.shape  # doctest: +SKIP
        (60000, 28, 28)
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise WorkbenchError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise WorkbenchError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) < 4:
        raise WorkbenchError(f"{path}: truncated IDX header: expected at least 4 bytes, found {len(raw)}")
    if raw[0] or raw[1] or raw[2] not in _IDX_DTYPES:
        raise WorkbenchError(f"{path}: not an IDX file (bad magic number 0x{raw[:4].hex()})")
    ndim, start = raw[3], 4 + 4 * raw[3]
    if len(raw) < start:
        raise WorkbenchError(f"{path}: truncated IDX header: expected {start} bytes, found {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected, found = math.prod(dims) * dtype.itemsize, len(raw) - start
    if found < expected:
        raise WorkbenchError(f"{path}: truncated IDX data: shape {dims} needs {expected} bytes, found {found}")
    if found > expected:
        raise WorkbenchError(f"{path}: {found - expected} unexpected bytes after the IDX data of shape {dims}")
    data = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=start)
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def _canonical(name: object) -> str:
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else ""
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise WorkbenchError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return key


def _find_idx(folder: Path, base: str) -> Path | None:
    for p in (folder / base, folder / f"{base}.gz"):
        if p.is_file():
            return p
    return None


def _missing(key: str, folder: Path) -> list[str]:
    if key == "cifar10":
        return [f for f in _CIFAR_FILES if not (folder / f).is_file()]
    return [f for f in _IDX_FILES if _find_idx(folder, f) is None]


def _find_folder(key: str, root: str | os.PathLike | None) -> Path:
    """First candidate folder that holds every expected file, else a WorkbenchError saying what is missing."""
    if root is not None:
        base = Path(root).expanduser()
    else:
        env = os.environ.get("WORKBENCH_DATA")
        base = (Path(env).expanduser() if env else Path.home() / ".cache" / "workbench" / "data") / key
    if key == "cifar10":
        sub = [base, base / _CIFAR_DIR] + ([base / key, base / key / _CIFAR_DIR] if root is not None else [])
        expected = f"the 'CIFAR-10 python version' files {', '.join(_CIFAR_FILES)} (in {_CIFAR_DIR}/ or directly)"
    else:
        sub = [base, base / key] if root is not None else [base]
        expected = f"the four IDX files {', '.join(_IDX_FILES)} (each plain or with .gz)"
    for d in sub:
        if d.is_dir() and not _missing(key, d):
            return d.resolve()
    where = str(base) + (f" (also looked in {', '.join(str(d) for d in sub[1:])})" if len(sub) > 1 else "")
    found = min((d for d in sub if d.is_dir()), key=lambda d: len(_missing(key, d)), default=None)
    detail = f"missing {', '.join(_missing(key, found))} in {found}" if found else "the folder does not exist"
    raise WorkbenchError(
        f"{key} not found in {where}: {detail}. Expected {expected}. Nothing is downloaded: place the "
        f"files there yourself, or set WORKBENCH_DATA to a folder containing {key}/, or pass root=."
    )


@functools.lru_cache(maxsize=4)
def _load_cached(key: str, folder: str, seed: int) -> Dataset:
    if key in ("digits", "digits28"):
        return _load_digits(key, seed)
    if key == "cifar10":
        return _load_cifar(Path(folder), seed)
    return _load_idx_dataset(key, Path(folder), seed)


def _stratified(y: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split  # sklearn is slow to import; only loading needs it

    try:
        return train_test_split(np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed)
    except ValueError as e:
        raise WorkbenchError(f"cannot split {what} into stratified parts: {e}") from None


def _split_seeds(seed: int) -> list[int]:
    # SeedSequence turns any int >= 0 into well-mixed 32-bit seeds that sklearn accepts.
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(2)]


def _channel_stats(X: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std, accumulated in float64 chunk by chunk (no full copy)."""
    count, zero = X.shape[0] * X.shape[2] * X.shape[3], torch.zeros(X.shape[1], dtype=torch.float64)
    mean = sum((c.double().sum(dim=(0, 2, 3)) for c in X.split(4096)), zero) / count
    m = mean.view(1, -1, 1, 1)
    std = (sum((((c.double() - m) ** 2).sum(dim=(0, 2, 3)) for c in X.split(4096)), zero) / count).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel is left as is, not divided by 0
    return tuple(mean.tolist()), tuple(std.tolist())


def _build(name: str, splits: dict[str, tuple[torch.Tensor, np.ndarray]], classes: tuple[str, ...],
           seed: int) -> Dataset:
    """Normalize every split in place with the train statistics and wrap them."""
    mean, std = _channel_stats(splits["train"][0])
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    fields = {}
    for split, (X, y) in splits.items():
        fields[f"X_{split}"] = X.sub_(m).div_(s)
        fields[f"y_{split}"] = torch.as_tensor(np.asarray(y, dtype=np.int64))
    return Dataset(name=name, classes=classes, mean=mean, std=std, seed=seed, **fields)


def _take(X: torch.Tensor, y: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    return X[torch.from_numpy(idx)], y[idx]


def _load_digits(key: str, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    raw = load_digits()
    X = torch.from_numpy((raw.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = raw.target.astype(np.int64)
    s1, s2 = _split_seeds(seed)
    rest, test = _stratified(y, 0.2, s1, "digits")
    train, val = _stratified(y[rest], 0.125, s2, "digits")  # 10% of all = 12.5% of the remaining 80%
    train, val = rest[train], rest[val]
    if key == "digits28":
        # As MNIST was made: the digit scaled into a 20x20 box, centred in 28x28 with a 4-pixel
        # empty border (so 5x5 convolutions see whole strokes at the edges; LeNet-5 needs it).
        X = F.pad(F.interpolate(X, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    splits = {"train": _take(X, y, train), "val": _take(X, y, val), "test": _take(X, y, test)}
    return _build(key, splits, _DIGIT_CLASSES, seed)


def _check_labels(y: np.ndarray, n: int, source: str) -> np.ndarray:
    if y.ndim != 1:
        raise WorkbenchError(f"{source}: labels must be 1-D, got shape {y.shape}")
    if len(y) != n:
        raise WorkbenchError(f"{source}: {len(y)} labels for {n} images")
    if not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or y.max() > 9)):
        raise WorkbenchError(f"{source}: labels must be integers 0..9")
    return y.astype(np.int64)


def _read_idx_pair(folder: Path, prefix: str) -> tuple[torch.Tensor, np.ndarray]:
    images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        got = f"{images.ndim}-D {images.dtype}"
        raise WorkbenchError(f"{images_path}: images must be 3-D uint8 (N, H, W), got {got}")
    labels = _check_labels(read_idx(labels_path), len(images), str(labels_path))
    return torch.from_numpy(images).unsqueeze(1).float().div_(255.0), labels


def _load_idx_dataset(key: str, folder: Path, seed: int) -> Dataset:
    X, y = _read_idx_pair(folder, "train")
    X_test, y_test = _read_idx_pair(folder, "t10k")
    if X.shape[1:] != X_test.shape[1:]:
        raise WorkbenchError(f"{folder}: train images are {tuple(X.shape[2:])}, test {tuple(X_test.shape[2:])}")
    train, val = _stratified(y, 0.1, _split_seeds(seed)[0], f"the {key} train set")
    splits = {"train": _take(X, y, train), "val": _take(X, y, val), "test": (X_test, y_test)}
    return _build(key, splits, _DIGIT_CLASSES if key == "mnist" else _FASHION_CLASSES, seed)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; refuses every other global (no code runs)."""

    _ALLOWED = {(f"numpy.{c}.multiarray", "_reconstruct") for c in ("core", "_core")}
    _ALLOWED |= {(f"numpy.{c}.numeric", "_frombuffer") for c in ("core", "_core")}  # pickle protocol 5
    _ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # protocol <= 2 bytes
    _ALLOWED |= {(m, n) for m in ("builtins", "__builtin__") for n in ("bytes", "bytearray", "set", "frozenset")}

    def __init__(self, file, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise WorkbenchError(
                f"refusing to unpickle {module}.{name} from {self.source}: CIFAR batches contain only arrays")
        if name.startswith("_"):  # both spellings map to this numpy's own; importing numpy.core warns on numpy 2
            try:
                from numpy._core import multiarray, numeric
            except ImportError:  # numpy < 2
                from numpy.core import multiarray, numeric
            return multiarray._reconstruct if name == "_reconstruct" else numeric._frombuffer
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnlyUnpickler(f, path).load()
    except WorkbenchError:
        raise
    except Exception as e:  # truncated or corrupt input can fail in many ways; all mean the same to the user
        raise WorkbenchError(f"{path}: corrupt or truncated CIFAR-10 pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise WorkbenchError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise WorkbenchError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {shape}")
    if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
        raise WorkbenchError(f"{path}: b'labels' must be a list of integers")
    return data.reshape(-1, 3, 32, 32), _check_labels(np.asarray(labels), len(data), str(path))


def _load_cifar(folder: Path, seed: int) -> Dataset:
    parts = [_read_cifar_batch(folder / f) for f in _CIFAR_FILES[:5]]
    x_raw, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    del parts
    test_raw, y_test = _read_cifar_batch(folder / "test_batch")
    names = _unpickle(folder / "batches.meta").get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise WorkbenchError(f"{folder / 'batches.meta'}: b'label_names' must be a list of 10 names")
    classes = tuple(n.decode("latin-1") if isinstance(n, bytes) else str(n) for n in names)
    X, X_test = (torch.from_numpy(a).float().div_(255.0) for a in (x_raw, test_raw))
    train, val = _stratified(y, 0.1, _split_seeds(seed)[0], "the cifar10 train set")
    splits = {"train": _take(X, y, train), "val": _take(X, y, val), "test": (X_test, y_test)}
    return _build("cifar10", splits, classes, seed)
