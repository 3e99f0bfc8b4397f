// Chapter 11: a drawing -> the model's input, as scikit-learn's digits were made (UCI "Optical
// Recognition of Handwritten Digits"): a 32x32 black-and-white bitmap cut into 4x4 blocks, the on
// pixels of each block counted (0..16), then normalized as workbench.data does.
//
// No DOM here, so Node runs it too: tests/test_browser.py holds every function against its Python
// twin in workbench/browser.py (same operations in the same order, so the same bits).

export const BITMAP = 32;
export const BLOCK = 4;
export const STROKE_RADIUS = 1.8;

// strokes: [[[x, y], ...], ...] in canvas pixels -> Uint8Array(size * size) of 0/1, row-major.
// The bounding box is scaled (aspect kept) until the ink of its longer side spans the bitmap, and
// centred: in the dataset every digit touches the top and bottom rows.
export function renderStrokes(strokes, size = BITMAP, radius = STROKE_RADIUS) {
  const bitmap = new Uint8Array(size * size);
  const pts = strokes.flat();
  if (pts.length === 0) return bitmap;
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const span = Math.max(x1 - x0, y1 - y0, 1e-9);
  const scale = (size - 2 * radius) / span;
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  const segs = [];
  for (const s of strokes) {
    const p = s.map(([x, y]) => [(x - cx) * scale + size / 2, (y - cy) * scale + size / 2]);
    if (p.length === 1) segs.push([p[0], p[0]]);
    for (let i = 0; i + 1 < p.length; i++) segs.push([p[i], p[i + 1]]);
  }
  const r2 = radius * radius;
  for (let row = 0; row < size; row++) {
    for (let col = 0; col < size; col++) {
      const px = col + 0.5, py = row + 0.5;
      for (const [[ax, ay], [bx, by]] of segs) {
        const dx = bx - ax, dy = by - ay;
        const d2 = dx * dx + dy * dy;
        const t = d2 === 0 ? 0 : Math.min(1, Math.max(0, ((px - ax) * dx + (py - ay) * dy) / d2));
        const ex = ax + t * dx - px, ey = ay + t * dy - py;
        if (ex * ex + ey * ey <= r2) { bitmap[row * size + col] = 1; break; }
      }
    }
  }
  return bitmap;
}

// On pixels per block x block block: a 32x32 bitmap -> 64 counts 0..16 (row-major 8x8).
export function blockCounts(bitmap, size = BITMAP, block = BLOCK) {
  const n = size / block;
  const counts = new Array(n * n).fill(0);
  for (let row = 0; row < size; row++) {
    for (let col = 0; col < size; col++) {
      if (bitmap[row * size + col]) counts[Math.floor(row / block) * n + Math.floor(col / block)] += 1;
    }
  }
  return counts;
}

// Counts 0..16 -> float32 input: (count / 16 - mean) / std, every step rounded to float32 as torch
// computes it (workbench.data.load: images / 16.0 cast to float32, then sub_(mean).div_(std)).
export function normalize(counts, mean, std) {
  const m = Math.fround(mean), s = Math.fround(std);
  const x = new Float32Array(counts.length);
  for (let i = 0; i < counts.length; i++) x[i] = Math.fround(Math.fround(counts[i] / 16) - m) / s;
  return x;
}

export function softmax(logits) {
  const max = Math.max(...logits);
  const e = Array.from(logits, (v) => Math.exp(v - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

export function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

export function median(values) {
  const v = [...values].sort((a, b) => a - b);
  const mid = Math.floor(v.length / 2);
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}
