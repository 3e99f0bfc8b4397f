"""Tests for workbench.data: digits splits and normalization, IDX and CIFAR-10 readers, errors."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from workbench import data
from workbench.data import DATASETS, Dataset, load, read_idx
from workbench.errors import WorkbenchError

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@pytest.fixture(autouse=True)
def fresh_cache():
    data._load_cached.cache_clear()
    yield
    data._load_cached.cache_clear()


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    header = bytes([0, 0, IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_idx(path, arr: np.ndarray, gz: bool = False):
    raw = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def make_mnist(folder, gz=False, seed=0):
    """10 train and 2 test images per class, 28x28 uint8, written as real IDX files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, per_class in (("train", 10), ("t10k", 2)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


def dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar(folder, seed=0, protocol=2):
    """Five train batches of 20 and a test batch of 20, each 2 images per class, pickled like the original."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in CIFAR_NAMES[:6]:
        labels = [int(v) for v in rng.permutation(np.repeat(np.arange(10), 2))]
        # Channel offsets make the three per-channel means clearly different.
        pixels = rng.integers(0, 156, size=(20, 3, 1024)) + np.array([0, 50, 100]).reshape(1, 3, 1)
        batches[name] = {b"data": pixels.reshape(20, 3072).astype(np.uint8), b"labels": labels}
        dump(folder / name, batches[name], protocol)
    names = [n.encode() for n in "airplane automobile bird cat deer dog frog horse ship truck".split()]
    dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072}, protocol)
    return batches


def raw_pixels(ds: Dataset, split: str, scale: float) -> np.ndarray:
    """Undo the normalization and the [0,1] scaling: back to the integer pixels that were stored."""
    X = ds.split(split)[0]
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    return ((X * std + mean) * scale).numpy()


def sorted_rows(a: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1)
    return a[np.lexsort(a.T[::-1])]


# --- digits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "side"), [("digits", 8), ("digits28", 28)])
def test_digits_shapes_dtypes_and_sizes(name, side):
    ds = load(name)
    assert ds.input_shape == (1, side, side) and ds.num_classes == 10 and ds.classes == tuple("0123456789")
    for split in ("train", "val", "test"):
        X, y = ds.split(split)
        assert X.dtype == torch.float32 and y.dtype == torch.int64
        assert X.shape == (len(y), 1, side, side)
    assert sum(ds.sizes.values()) == 1797
    assert ds.sizes == {"train": 1257, "val": 180, "test": 360}


def test_digits_split_is_stratified():
    ds = load("digits")
    overall = np.bincount(load_digits().target, minlength=10) / 1797
    for split in ("train", "val", "test"):
        y = ds.split(split)[1].numpy()
        assert np.abs(np.bincount(y, minlength=10) / len(y) - overall).max() < 0.02


def test_same_seed_is_deterministic_and_memoized():
    a = load("digits", seed=3)
    assert load("DIGITS", seed=3) is a
    data._load_cached.cache_clear()
    b = load("digits", seed=3)
    assert b is not a and b.fingerprint == a.fingerprint
    for split in ("train", "val", "test"):
        assert all(torch.equal(s, t) for s, t in zip(a.split(split), b.split(split)))


def test_other_seed_gives_other_split():
    a, b = load("digits", seed=0), load("digits", seed=1)
    assert a.fingerprint != b.fingerprint
    assert not torch.equal(a.y_test, b.y_test)
    assert a.sizes == b.sizes


def test_fingerprint_changes_with_any_value():
    ds = load("digits")
    X_val = ds.X_val.clone()
    X_val[0, 0, 0, 0] += 1e-3
    other = dataclasses.replace(ds, X_val=X_val)
    assert len(ds.fingerprint) == 64 and other.fingerprint != ds.fingerprint


def test_digits_normalized_with_train_stats_only():
    ds = load("digits", seed=0)
    X = ds.X_train.double()
    assert abs(X.mean().item()) < 1e-4 and abs(X.std(unbiased=False).item() - 1) < 1e-4
    # Undo the normalization with the stored stats: every split must come back to integer 0..16
    # pixels (so val/test used the same affine map) that together are exactly the sklearn images.
    pixels = {s: raw_pixels(ds, s, 16.0) for s in ("train", "val", "test")}
    for p in pixels.values():
        assert np.abs(p - p.round()).max() < 1e-3
    recovered = np.concatenate([p.round() for p in pixels.values()])
    assert np.array_equal(sorted_rows(recovered), sorted_rows(load_digits().images.astype(np.float32)))
    train = pixels["train"].round() / 16.0
    assert ds.mean[0] == pytest.approx(train.mean(), abs=1e-6)
    assert ds.std[0] == pytest.approx(train.std(), abs=1e-6)
    assert abs(ds.X_val.mean().item()) > 1e-4  # val is not re-centred on its own


def test_digits28_is_mnist_style_resize_of_digits():
    small, big = load("digits", seed=2), load("digits28", seed=2)
    for split in ("train", "val", "test"):
        assert torch.equal(small.split(split)[1], big.split(split)[1])
    image = torch.from_numpy(raw_pixels(small, "val", 1.0)[5:6])
    expected = F.pad(F.interpolate(image, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    assert torch.allclose(torch.from_numpy(raw_pixels(big, "val", 1.0)[5:6]), expected, atol=1e-5)


def test_split_repr_and_errors():
    ds = load("digits")
    assert ds.split("test")[0] is ds.X_test
    with pytest.raises(WorkbenchError, match="unknown split 'validation'"):
        ds.split("validation")
    text = repr(ds)
    assert "digits" in text and "train=1257" in text and "tensor" not in text and len(text) < 200


def test_unknown_name_lists_known_datasets():
    with pytest.raises(WorkbenchError) as info:
        load("foo")
    assert str(info.value) == "unknown dataset 'foo'; known datasets: " + ", ".join(DATASETS)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True, None])
def test_bad_seed(seed):
    with pytest.raises(WorkbenchError, match="seed"):
        load("digits", seed=seed)


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("layout", ["folder", "parent"])
def test_idx_dataset_roundtrip(tmp_path, gz, name, layout):
    canonical = name.replace("_", "-")
    folder = tmp_path / canonical if layout == "parent" else tmp_path
    written = make_mnist(folder, gz)
    ds = load(name, root=tmp_path)
    assert ds.name == canonical and ds.input_shape == (1, 28, 28)
    assert ds.sizes == {"train": 90, "val": 10, "test": 20}
    assert sorted(ds.y_val.tolist()) == list(range(10))  # stratified: one per class
    assert ds.classes[9] == ("9" if canonical == "mnist" else "Ankle boot") and len(ds.classes) == 10
    # The official test set is the test split, in file order.
    test_images, test_labels = written["t10k"]
    assert np.abs(raw_pixels(ds, "test", 255.0)[:, 0] - test_images).max() < 1e-3
    assert ds.y_test.tolist() == test_labels.tolist()
    # Train + val are exactly the official train set, labels travelling with their images.
    images, labels = written["train"]
    pixels = np.concatenate([raw_pixels(ds, "train", 255.0), raw_pixels(ds, "val", 255.0)]).round()
    ys = torch.cat([ds.y_train, ds.y_val]).numpy()
    got = np.concatenate([pixels.reshape(100, -1), ys[:, None]], axis=1)
    want = np.concatenate([images.reshape(100, -1), labels[:, None]], axis=1)
    assert np.array_equal(sorted_rows(got), sorted_rows(want))
    train_px = raw_pixels(ds, "train", 1.0)
    assert ds.mean[0] == pytest.approx(train_px.mean(), abs=1e-5)


def test_workbench_data_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path))
    with pytest.raises(WorkbenchError, match=str(tmp_path / "mnist")):
        load("mnist")
    make_mnist(tmp_path / "mnist")
    assert load("mnist").sizes["test"] == 20


@pytest.mark.parametrize("partial", [False, True], ids=["no-folder", "one-file-missing"])
def test_missing_idx_files_are_named(tmp_path, partial):
    root = tmp_path / "nowhere"
    if partial:
        make_mnist(root)
        (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(WorkbenchError) as info:
        load("mnist", root=root)
    message = str(info.value)
    assert str(root) in message and "downloaded" in message and ".gz" in message
    assert all(n in message for n in IDX_NAMES)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda raw: b"\x08\x03" + raw[2:], "not an IDX file \\(bad magic number 0x0803"),
        (lambda raw: raw[:2] + b"\x07" + raw[3:], "bad magic"),
        (lambda raw: raw[:-5], "truncated IDX data.*needs 78400 bytes, found 78395"),
        (lambda raw: raw[:9], "truncated IDX header: expected 16 bytes, found 9"),
        (lambda raw: raw + b"\0", "unexpected bytes"),
        (lambda raw: raw[:4] + b"\xff" * 12 + raw[16:], "truncated IDX data"),
        (lambda raw: idx_bytes(np.zeros((100, 28), np.uint8)), "3-D"),
    ],
    ids=["magic", "dtype-code", "short-data", "short-header", "trailing", "huge-dims", "ndim"],
)
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_corrupt_idx_images(tmp_path, corrupt, match, gz):
    make_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = corrupt(path.read_bytes())
    path.unlink()
    write_path = path.with_name(path.name + ".gz") if gz else path
    write_path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(WorkbenchError, match=match) as info:
        load("mnist", root=tmp_path)
    assert str(write_path) in str(info.value)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.zeros((100, 1), np.uint8), "1-D"),
        (np.zeros(99, np.uint8), "99 labels for 100 images"),
        (np.full(100, 10, np.uint8), "0..9"),
    ],
)
def test_bad_idx_labels(tmp_path, labels, match):
    make_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.raises(WorkbenchError, match=match):
        load("mnist", root=tmp_path)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(50, dtype=np.uint8)))[:-12])
    with pytest.raises(WorkbenchError, match="truncated"):
        read_idx(path)


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_read_idx_roundtrip(tmp_path, dtype, gz):
    arr = (np.arange(24).reshape(2, 3, 4) * (1 if dtype in ("u1", "i1") else -12345.25)).astype(dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))  # gzip found by magic, not suffix
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype.isnative and np.array_equal(out, arr)


# --- CIFAR-10 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["batches-folder", "parent", "env"])
def test_cifar_roundtrip(tmp_path, monkeypatch, layout):
    batches = make_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    if layout == "env":
        monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path))
        ds = load("CIFAR10")
    else:
        root = tmp_path / "cifar10"
        ds = load("cifar10", root=root / "cifar-10-batches-py" if layout == "batches-folder" else root)
    assert ds.input_shape == (3, 32, 32) and ds.sizes == {"train": 90, "val": 10, "test": 20}
    assert ds.classes[:2] == ("airplane", "automobile") and ds.classes[-1] == "truck"
    X = ds.X_train.double()
    assert torch.allclose(X.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(X.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)
    assert ds.mean[0] < ds.mean[1] < ds.mean[2] and len(ds.std) == 3
    train_px = raw_pixels(ds, "train", 1.0)
    assert np.allclose(ds.mean, train_px.mean(axis=(0, 2, 3)), atol=1e-5)
    test = batches["test_batch"]
    assert np.abs(raw_pixels(ds, "test", 255.0) - test[b"data"].reshape(20, 3, 32, 32)).max() < 1e-3
    assert ds.y_test.tolist() == test[b"labels"]
    all_train = np.concatenate([batches[n][b"data"] for n in CIFAR_NAMES[:5]])
    pixels = np.concatenate([raw_pixels(ds, "train", 255.0), raw_pixels(ds, "val", 255.0)]).round()
    assert np.array_equal(sorted_rows(pixels), sorted_rows(all_train.astype(np.float32)))


@pytest.mark.parametrize("protocol", [4, 5])
def test_cifar_newer_pickle_protocols(tmp_path, protocol):
    batches = make_cifar(tmp_path, protocol=protocol)
    ds = load("cifar10", root=tmp_path)
    assert ds.y_test.tolist() == batches["test_batch"][b"labels"] and ds.classes[3] == "cat"


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", ["data_batch_3", "batches.meta"])
def test_cifar_refuses_code_in_pickles(tmp_path, target):
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    dump(tmp_path / target, {b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 20, b"x": _Exploit(marker)})
    with pytest.raises(WorkbenchError, match="refusing to unpickle .*system from .*" + target):
        load("cifar10", root=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "corrupt or truncated"),
        (lambda p: p.write_bytes(b""), "corrupt or truncated"),
        (lambda p: dump(p, {b"data": np.zeros((20, 100), np.uint8), b"labels": [0] * 20}), "3072"),
        (lambda p: dump(p, {b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 19}), "19 labels"),
        (lambda p: dump(p, {b"data": np.zeros((20, 3072), np.uint8), b"labels": [[0]] * 20}), "list of integers"),
        (lambda p: dump(p, [1, 2, 3]), "dict"),
        (lambda p: p.unlink(), "missing data_batch_2"),
    ],
    ids=["truncated", "empty", "shape", "labels", "nested-labels", "not-a-dict", "missing"],
)
def test_cifar_damaged_batch(tmp_path, damage, match):
    make_cifar(tmp_path)
    damage(tmp_path / "data_batch_2")
    with pytest.raises(WorkbenchError, match=match) as info:
        load("cifar10", root=tmp_path)
    assert "data_batch_2" in str(info.value)


def test_cifar_missing_folder_names_files(tmp_path):
    with pytest.raises(WorkbenchError) as info:
        load("cifar10", root=tmp_path / "absent")
    message = str(info.value)
    assert "does not exist" in message and "downloaded" in message and all(n in message for n in CIFAR_NAMES)


def test_cifar_partial_subfolder_is_reported(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(WorkbenchError, match="missing test_batch in .*cifar-10-batches-py"):
        load("cifar10", root=tmp_path)
