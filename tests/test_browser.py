"""workbench.browser: the files chapter 11's page loads, and its digit preprocessing in Python and in JavaScript."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from workbench import browser, data
from workbench import onnx as wonnx
from workbench.errors import WorkbenchError
from workbench.recipe import Recipe, run

ROOT = Path(__file__).resolve().parents[1]
DIGITS_JS = ROOT / "book" / "_static" / "browser" / "digits.mjs"

STROKES = {
    "seven": [[(40, 30), (160, 30), (60, 200)]],
    "zero": [[(100 + 50 * np.cos(t), 110 + 80 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 40)]],
    "plus": [[(20, 100), (180, 100)], [(100, 20), (100, 180)]],
    "dot": [[(50, 50)]],
    "wide": [[(0, 0), (300, 10)]],
}


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _bitmap_from_counts(counts: np.ndarray) -> np.ndarray:
    """A 32x32 bitmap whose 4x4 blocks hold exactly `counts` on pixels (the first ones of each block)."""
    bitmap = np.zeros((32, 32), dtype=bool)
    for (i, j), c in np.ndenumerate(counts.reshape(8, 8)):
        block = np.zeros(16, dtype=bool)
        block[:c] = True
        bitmap[4 * i:4 * i + 4, 4 * j:4 * j + 4] = block.reshape(4, 4)
    return bitmap


def test_test_counts_normalize_back_to_the_dataset_exactly(digits):
    counts = browser.test_counts(digits)
    assert counts.shape == (len(digits.y_test), 64) and counts.min() == 0 and counts.max() == 16
    x = browser.normalize(counts, digits.mean[0], digits.std[0]).reshape(digits.X_test.shape)
    assert x.dtype == np.float32 and np.array_equal(x, digits.X_test.numpy())


def test_block_counts_of_a_bitmap_give_back_the_dataset_image(digits):
    counts = browser.test_counts(digits)
    for k in (0, 1, 17, 359):
        assert np.array_equal(browser.block_counts(_bitmap_from_counts(counts[k])).ravel(), counts[k])


def test_block_counts_rejects_a_bitmap_of_the_wrong_shape():
    with pytest.raises(WorkbenchError, match="divisible by 4"):
        browser.block_counts(np.zeros((30, 30)))


def test_render_strokes_spans_the_height_like_the_dataset():
    bitmap = browser.render_strokes(STROKES["seven"])
    assert bitmap[0].any() and bitmap[-1].any()             # every dataset digit touches both rows
    assert not bitmap[:, 0].any() and not bitmap[:, -1].any()  # narrower than tall: centred, not stretched
    assert not browser.render_strokes([]).any()
    counts = browser.block_counts(bitmap)
    assert counts.max() <= 16 and 50 <= counts.sum() <= 600


def test_the_dataset_rejects_other_inputs():
    with pytest.raises(WorkbenchError, match="8x8"):
        browser.test_counts(data.load("digits28"))


def test_export_round_trips(digits, tmp_path):
    recipe = Recipe(model="mlp", dataset="digits", epochs=1, latency_repeats=5)
    res = run(recipe, cache=tmp_path / "cache", progress=False)
    out = tmp_path / "site"
    manifest = json.loads(browser.export({"fp32": res}, digits, out, notes={"fp32": "baseline"}).read_text())
    (v,) = manifest["variants"]
    assert v["name"] == "fp32" and v["note"] == "baseline" and v["accuracy"] == res.accuracy
    assert (out / v["file"]).read_bytes() == Path(res.onnx_path).read_bytes() and v["bytes"] == res.size_onnx_bytes
    test = browser.read_test(out)
    assert test["labels"] == digits.y_test.tolist() and test["shape"] == [1, 8, 8]
    x = browser.normalize(test["counts"], test["mean"], test["std"]).reshape(-1, 1, 8, 8)
    logits = wonnx.run_session(wonnx.session(out / v["file"]), x)
    assert test["predictions"]["fp32"] == logits.argmax(1).tolist()
    assert v["python_ort_accuracy"] == pytest.approx(res.accuracy, abs=1 / len(test["labels"]) + 1e-12)


def test_export_needs_an_onnx_model(digits, tmp_path):
    res = run(Recipe(model="mlp", dataset="digits", epochs=1, export_onnx=False), cache=tmp_path, progress=False)
    with pytest.raises(WorkbenchError, match="export_onnx=True"):
        browser.export({"fp32": res}, digits, tmp_path / "site")


_NODE_SCRIPT = """
import { renderStrokes, blockCounts, normalize } from %s;
const input = JSON.parse(process.argv[1]);
const out = {};
for (const [name, strokes] of Object.entries(input.strokes)) {
  const bitmap = renderStrokes(strokes);
  out[name] = { bitmap: Array.from(bitmap), counts: blockCounts(bitmap) };
}
out.normalized = Array.from(normalize(input.counts, input.mean, input.std));
out.fromBitmap = blockCounts(input.bitmap);
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js not found (apt-get install nodejs)")
def test_javascript_matches_python(digits):
    """The page's digits.mjs, run in Node, against workbench.browser: same bitmaps, counts and float32 bits."""
    counts = browser.test_counts(digits)
    strokes = {k: [[[float(x), float(y)] for x, y in s] for s in v] for k, v in STROKES.items()}
    payload = {"strokes": strokes, "counts": counts[:20].ravel().tolist(), "mean": digits.mean[0],
               "std": digits.std[0], "bitmap": _bitmap_from_counts(counts[3]).astype(int).ravel().tolist()}
    script = _NODE_SCRIPT % json.dumps(DIGITS_JS.as_uri())
    proc = subprocess.run(["node", "--input-type=module", "-e", script, json.dumps(payload)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    js = json.loads(proc.stdout)
    for name, s in strokes.items():
        bitmap = browser.render_strokes(s)
        assert np.array_equal(np.array(js[name]["bitmap"], dtype=bool).reshape(32, 32), bitmap), name
        assert js[name]["counts"] == browser.block_counts(bitmap).ravel().tolist(), name
    py = browser.normalize(counts[:20].ravel(), digits.mean[0], digits.std[0])
    assert np.array_equal(np.array(js["normalized"], dtype=np.float32), py)   # float32 bit for bit
    assert np.array_equal(np.array(js["normalized"], dtype=np.float32).reshape(20, 1, 8, 8), digits.X_test[:20].numpy())
    assert js["fromBitmap"] == counts[3].tolist()
