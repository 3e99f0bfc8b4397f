"""Chapter 11's models in the browser: the files the page loads, and the page's digit preprocessing in Python.

The book's chapter 11 runs ONNX models in the reader's browser with ONNX Runtime Web. `export` writes
what that page fetches: each variant's ``.onnx`` file, ``test.json`` (the test split as the integers
0..16 that scikit-learn's digits are made of, the labels, and the predictions of ONNX Runtime in
Python, so the page can report how often the browser agrees) and ``manifest.json`` (sizes, accuracy
and native latency per variant).

The page turns a drawing into the model's input the way the digits were made (UCI "Optical
Recognition of Handwritten Digits"): a 32x32 black-and-white bitmap, cut into 4x4 blocks, the on
pixels of each block counted (0..16). `render_strokes`, `block_counts` and `normalize` are those
steps in Python; ``book/_static/browser/digits.mjs`` is the same code in JavaScript, and
``tests/test_browser.py`` runs both and asserts they agree.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from . import onnx as _onnx
from .data import Dataset
from .errors import WorkbenchError

if TYPE_CHECKING:
    from .recipe import Result

__all__ = ["BITMAP", "BLOCK", "STROKE_RADIUS", "test_counts", "normalize", "block_counts", "render_strokes",
           "export", "read_test"]

BITMAP = 32          # side of the black-and-white bitmap a digit was drawn into
BLOCK = 4            # side of the blocks whose on pixels are counted: 32 / 4 = 8x8 values of 0..16
STROKE_RADIUS = 1.8  # pen radius in bitmap pixels: strokes 3 to 4 pixels wide, as the dataset's (about 300 of 1024 on)


def normalize(counts: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Counts 0..16 -> the model's float32 input, exactly as :func:`workbench.data.load` computes it.

    ``(count / 16)`` rounded to float32, then ``(x - mean) / std`` in float32 with the train split's
    mean and std (each step rounded to float32, as torch does and as the page's ``Math.fround`` does).

    Args:
        counts: integers 0..16, any shape (``(N, 64)``, ``(N, 8, 8)``...).
        mean: the dataset's (single-channel) mean, ``Dataset.mean[0]``.
        std: the dataset's std, ``Dataset.std[0]``.

    Returns:
        float32 array of ``counts``' shape.

    Example:
        >>> ds = load("digits"); x = normalize(test_counts(ds), ds.mean[0], ds.std[0])
    """
    x = (np.asarray(counts, dtype=np.float64) / 16.0).astype(np.float32)
    return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)


def test_counts(ds: Dataset) -> np.ndarray:
    """The test split as the dataset's integers 0..16, shape ``(N, 64)``, checked to normalize back exactly.

    Raises:
        WorkbenchError: ``ds`` is not an 8x8 single-channel digits dataset.
    """
    if ds.input_shape != (1, 8, 8):
        raise WorkbenchError(f"the browser page takes 8x8 digits (dataset 'digits'), got {ds.name!r} "
                             f"with input shape {ds.input_shape}")
    X = ds.X_test.numpy().reshape(len(ds.X_test), -1).astype(np.float64)
    counts = np.rint((X * ds.std[0] + ds.mean[0]) * 16.0).astype(np.int64)
    if counts.min() < 0 or counts.max() > 16 or not np.array_equal(
            normalize(counts, ds.mean[0], ds.std[0]), ds.X_test.numpy().reshape(counts.shape)):
        raise WorkbenchError(f"{ds.name!r}: the test images are not counts 0..16 normalized by mean and std")
    return counts


def block_counts(bitmap: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """On pixels per ``block x block`` block of a square black-and-white bitmap: 32x32 -> 8x8 of 0..16."""
    b = np.asarray(bitmap).astype(bool)
    n = b.shape[0] // block
    if b.shape != (n * block, n * block):
        raise WorkbenchError(f"bitmap must be square with a side divisible by {block}, got {b.shape}")
    return b.reshape(n, block, n, block).sum(axis=(1, 3)).astype(np.int64)


def render_strokes(strokes: Sequence[Sequence[Sequence[float]]], *, size: int = BITMAP,
                   radius: float = STROKE_RADIUS) -> np.ndarray:
    """Draw pen strokes into a ``size x size`` black-and-white bitmap, scaled and centred as the digits are.

    The drawing's bounding box is scaled, keeping its aspect ratio, until the ink of its longer side
    spans the bitmap, and centred: in the dataset every digit touches the top and bottom rows. A pixel is on when its centre lies within
    ``radius`` of a stroke. This is the page's ``renderStrokes`` (``digits.mjs``), in the same order
    of floating-point operations, so both give the same bitmap.

    Args:
        strokes: a list of strokes, each a list of ``(x, y)`` points in any units (canvas pixels).
        size: side of the bitmap.
        radius: pen radius in bitmap pixels.

    Returns:
        bool array ``(size, size)``; all False for no points.
    """
    pts = [(float(x), float(y)) for s in strokes for x, y in s]
    bitmap = np.zeros((size, size), dtype=bool)
    if not pts:
        return bitmap
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span = max(x1 - x0, y1 - y0, 1e-9)
    scale = (size - 2 * radius) / span
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    segs = []
    for s in strokes:
        p = [((x - cx) * scale + size / 2, (y - cy) * scale + size / 2) for x, y in s]
        segs += [(p[i], p[i + 1]) for i in range(len(p) - 1)] if len(p) > 1 else [(p[0], p[0])]
    r2 = radius * radius
    for row in range(size):
        for col in range(size):
            px, py = col + 0.5, row + 0.5
            for (ax, ay), (bx, by) in segs:
                dx, dy = bx - ax, by - ay
                d2 = dx * dx + dy * dy
                t = 0.0 if d2 == 0 else min(1.0, max(0.0, ((px - ax) * dx + (py - ay) * dy) / d2))
                ex, ey = ax + t * dx - px, ay + t * dy - py
                if ex * ex + ey * ey <= r2:
                    bitmap[row, col] = True
                    break
    return bitmap


def export(results: Mapping[str, Result], ds: Dataset, out_dir: str | os.PathLike, *,
           notes: Mapping[str, str] | None = None) -> Path:
    """Write the page's files: ``<name>.onnx`` per variant, ``test.json`` and ``manifest.json``.

    Args:
        results: variant name -> its Result (each with an exported ONNX model), in table order.
        ds: the dataset they were trained on (8x8 digits); its test split is written.
        out_dir: the folder the built site serves (created; files of earlier runs are replaced).
        notes: optional one-line note per variant for the page's table.

    Returns:
        The path of ``manifest.json``.

    Example:
        >>> export({"fp32": run(BASELINES["cnn_digits"])}, load("digits"), "book/_static/browser/models")
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = test_counts(ds)
    X = normalize(counts, ds.mean[0], ds.std[0]).reshape(-1, 1, 8, 8)
    y = ds.y_test.numpy()
    variants, predictions = [], {}
    for name, res in results.items():
        if not res.onnx_path:
            raise WorkbenchError(f"variant {name!r} has no ONNX model: run its recipe with export_onnx=True")
        dest = out / f"{name}.onnx"
        shutil.copyfile(res.onnx_path, dest)
        pred = _onnx.run_session(_onnx.session(dest), X).argmax(axis=1)
        predictions[name] = pred.tolist()
        variants.append({
            "name": name, "file": dest.name, "bytes": dest.stat().st_size,
            "encoded_bytes": res.size_encoded_bytes, "accuracy": res.accuracy,
            "python_ort_accuracy": float((pred == y).mean()), "sparsity": res.sparsity,
            "native_ort_p50_us": res.latency_ort_b1.p50_us if res.latency_ort_b1 else None,
            "note": (notes or {}).get(name, ""),
        })
    test = {"mean": ds.mean[0], "std": ds.std[0], "shape": [1, 8, 8], "counts": counts.tolist(),
            "labels": y.tolist(), "predictions": predictions}
    (out / "test.json").write_text(json.dumps(test, separators=(",", ":")))
    manifest = out / "manifest.json"
    manifest.write_text(json.dumps({"dataset": ds.name, "seed": ds.seed, "variants": variants}, indent=1))
    return manifest


def read_test(out_dir: str | os.PathLike) -> dict:
    """``test.json`` as written by :func:`export`, with ``counts`` as an ``(N, 64)`` int array."""
    test = json.loads((Path(out_dir) / "test.json").read_text())
    test["counts"] = np.asarray(test["counts"], dtype=np.int64)
    return test
