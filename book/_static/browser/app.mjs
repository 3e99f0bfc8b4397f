// Chapter 11: the book's compressed models, run in the reader's browser with ONNX Runtime Web.
//
// The notebook notebooks/10_browser.ipynb writes models/ (the .onnx files, test.json and
// manifest.json); `make book` copies ONNX Runtime Web (npm package onnxruntime-web, pinned in
// package.json) into ort/. Every URL here is relative to this file, so the site works from any
// sub-path and offline. WebAssembly execution provider, one thread: a static host cannot send the
// COOP/COEP headers that multi-threaded WebAssembly (SharedArrayBuffer) needs.
//
// The page holds three placeholders: #wb-browser-demo (draw or pick a digit), #wb-browser-table
// (every variant on the whole test split) and .wb-browser-ratio spans. window.workbenchBrowser.done
// resolves with the table's figures, and .finished holds them once done (tests/test_site.py reads them).

import { argmax, blockCounts, median, normalize, renderStrokes, softmax } from "./digits.mjs";

const HERE = new URL(".", import.meta.url);
const MODELS = new URL("models/", HERE);
const ORT_DIR = new URL("ort/", HERE);
const TIMED_BLOCK = 50;   // runs timed together: performance.now() is coarse (0.1 ms) without COOP/COEP
const LABELS = { fp32: "fp32", int8: "int8 (static QDQ)", pruned: "pruned", deep_compression: "Deep Compression" };

const state = { ort: null, manifest: null, test: null, sessions: {}, errors: [], results: {} };
let resolveDone;
window.workbenchBrowser = { done: new Promise((r) => { resolveDone = r; }), state };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function errorLine(where, message) {
  // One line on the page, never a blank area; the site check fails on any .wb-browser-error.
  state.errors.push(message);
  const line = el("p", { class: "wb-browser-error", role: "alert", text: message });
  if (where) where.append(line);
  return line;
}

const kb = (bytes) => (bytes == null ? "" : `${(bytes / 1024).toFixed(1)} KB`);
const pct = (x) => (x == null ? "" : `${(100 * x).toFixed(1)}%`);
const us = (x) => (x == null ? "" : `${x.toFixed(0)} µs`);

async function fetchOk(url, kind) {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`HTTP ${resp.status} for ${url.pathname.split("/").pop()}`);
  return kind === "json" ? resp.json() : resp.arrayBuffer();
}

async function loadRuntime() {
  const ort = await import(new URL("ort.wasm.min.mjs", ORT_DIR).href);
  ort.env.wasm.numThreads = 1;          // no SharedArrayBuffer on a static host without COOP/COEP
  ort.env.wasm.proxy = false;
  ort.env.wasm.wasmPaths = ORT_DIR.href;
  ort.env.logLevel = "error";
  return ort;
}

async function runOne(session, x) {
  const ort = state.ort;
  const feeds = { [session.inputNames[0]]: new ort.Tensor("float32", x, [1, 1, 8, 8]) };
  const out = await session.run(feeds);
  return out[session.outputNames[0]].data;
}

// Median per-run time over blocks of TIMED_BLOCK runs (inputs cycled), after a warm-up.
async function latencyUs(session, inputs, blocks) {
  for (let i = 0; i < 10; i++) await runOne(session, inputs[i % inputs.length]);
  const perRun = [];
  for (let b = 0; b < blocks; b++) {
    const t0 = performance.now();
    for (let i = 0; i < TIMED_BLOCK; i++) await runOne(session, inputs[(b * TIMED_BLOCK + i) % inputs.length]);
    perRun.push(((performance.now() - t0) * 1000) / TIMED_BLOCK);
  }
  return median(perRun);
}

// ---- the table: every variant on the whole test split ------------------------------------------

function buildTable(root) {
  const head = ["model", "file", "accuracy (Python)", "accuracy (your browser)", "agrees with Python",
    "latency (your browser)", "latency (native)"];
  const tbody = el("tbody");
  const table = el("table", { class: "wb-browser-results table" },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))), tbody);
  root.replaceChildren(el("div", { class: "wb-table-box" }, table), el("p", { class: "wb-browser-note" }));
  const rows = {};
  for (const v of state.manifest.variants) {
    const cells = head.map(() => el("td"));
    cells[0].textContent = LABELS[v.name] || v.name;
    cells[1].textContent = kb(v.bytes);
    if (v.encoded_bytes) cells[1].append(el("br"), el("small", { text: `${kb(v.encoded_bytes)} coded` }));
    cells[2].textContent = pct(v.accuracy);
    cells[3].textContent = "…";
    cells[6].textContent = us(v.native_ort_p50_us);
    const tr = el("tr", { "data-variant": v.name }, ...cells);
    tbody.append(tr);
    rows[v.name] = cells;
  }
  return rows;
}

async function evaluateVariant(v, cells) {
  const session = state.sessions[v.name];
  const { inputs, test } = state;
  let correct = 0, agree = 0;
  for (let i = 0; i < inputs.length; i++) {
    const pred = argmax(await runOne(session, inputs[i]));
    correct += pred === test.labels[i];
    agree += pred === test.predictions[v.name][i];
  }
  const n = inputs.length;
  const r = { accuracy: correct / n, agreement: agree / n, correct, n, latency_us: null,
    python_accuracy: v.accuracy, native_ort_p50_us: v.native_ort_p50_us, bytes: v.bytes };
  state.results[v.name] = r;
  cells[3].textContent = pct(r.accuracy);
  cells[3].title = `${correct} of ${n} test images`;
  cells[4].textContent = pct(r.agreement);
  cells[5].textContent = "…";
  return r;
}

// Latency per image, the variants side by side: one timed block of each in turn, ROUNDS times, so
// that whatever else the machine does slows them all alike; the median per variant.
async function measureLatencies(names, rows, rounds = 15) {
  const inputs = state.inputs;
  const perRun = Object.fromEntries(names.map((n) => [n, []]));
  for (const n of names) await latencyUs(state.sessions[n], inputs, 1);   // warm-up
  for (let b = 0; b < rounds; b++) {
    for (const n of names) {
      const t0 = performance.now();
      for (let i = 0; i < TIMED_BLOCK; i++) await runOne(state.sessions[n], inputs[(b * TIMED_BLOCK + i) % inputs.length]);
      perRun[n].push(((performance.now() - t0) * 1000) / TIMED_BLOCK);
    }
  }
  for (const n of names) {
    state.results[n].latency_us = median(perRun[n]);
    if (rows[n]) rows[n][5].textContent = us(state.results[n].latency_us);
  }
}

function showRatios() {
  const { fp32, int8 } = state.results;
  const ratio = fp32 && int8 ? int8.latency_us / fp32.latency_us : null;
  state.latencyRatioInt8OverFp32 = ratio;
  document.querySelectorAll(".wb-browser-ratio").forEach((span) => {
    span.textContent = ratio == null ? "(not measured)" : `${ratio.toFixed(2)}x`;
  });
}

// ---- the demo: draw a digit, or pick a test image ----------------------------------------------

function buildDemo(root) {
  const names = state.manifest.variants.map((v) => v.name).filter((n) => state.sessions[n]);
  const canvas = el("canvas", { class: "wb-draw", width: "224", height: "224",
    "aria-label": "draw a digit here" });
  const preview = el("canvas", { class: "wb-preview", width: "8", height: "8", "aria-label": "what the model sees" });
  const select = el("select", { class: "wb-variant", "aria-label": "model" },
    ...names.map((n) => el("option", { value: n, text: LABELS[n] || n })));
  const clear = el("button", { type: "button", class: "wb-clear", text: "clear" });
  const pick = el("input", { type: "number", class: "wb-pick", min: "0", max: String(state.inputs.length - 1),
    value: "0", "aria-label": "test image number" });
  const random = el("button", { type: "button", class: "wb-random", text: "random test image" });
  const source = el("p", { class: "wb-source" });
  const prediction = el("p", { class: "wb-prediction", "aria-live": "polite" });
  const bars = el("div", { class: "wb-bars" });
  const barFills = [];
  for (let d = 0; d < 10; d++) {
    const fill = el("span", { class: "wb-bar-fill" });
    const value = el("span", { class: "wb-bar-value" });
    bars.append(el("div", { class: "wb-bar" }, el("span", { class: "wb-bar-label", text: String(d) }),
      el("span", { class: "wb-bar-track" }, fill), value));
    barFills.push([fill, value]);
  }
  const latency = el("p", { class: "wb-latency" });
  root.replaceChildren(el("div", { class: "wb-demo" },
    el("div", { class: "wb-col" }, canvas, el("div", { class: "wb-controls" }, clear)),
    el("div", { class: "wb-col" }, el("div", { class: "wb-preview-box" }, preview,
      el("span", { class: "wb-caption", text: "what the model sees (8x8, 0..16)" })),
    el("div", { class: "wb-controls" }, pick, random), el("label", {}, "model ", select)),
    el("div", { class: "wb-col wb-out" }, source, prediction, bars, latency)));

  const ctx = canvas.getContext("2d");
  let strokes = [];
  let current = null;
  let counts = null;   // the input shown, as 64 counts, or null for "nothing to classify"
  let token = 0;

  function drawPreview() {
    const p = preview.getContext("2d");
    const img = p.createImageData(8, 8);
    for (let i = 0; i < 64; i++) {
      const g = 255 - Math.round(((counts ? counts[i] : 0) * 255) / 16);
      img.data.set([g, g, g, 255], i * 4);
    }
    p.putImageData(img, 0, 0);
  }

  function redraw() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = "#111";
    ctx.lineWidth = 14;
    ctx.lineCap = ctx.lineJoin = "round";
    for (const s of strokes) {
      ctx.beginPath();
      s.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      if (s.length === 1) ctx.lineTo(s[0][0] + 0.1, s[0][1]);
      ctx.stroke();
    }
  }

  async function classify() {
    drawPreview();
    const mine = ++token;
    if (!counts || counts.every((c) => c === 0)) {
      prediction.textContent = "Draw a digit in the box, or pick a test image.";
      prediction.dataset.digit = "";
      barFills.forEach(([f, v]) => { f.style.width = "0"; v.textContent = ""; });
      latency.textContent = "";
      return;
    }
    const session = state.sessions[select.value];
    const x = normalize(counts, state.test.mean, state.test.std);
    const probs = softmax(await runOne(session, x));
    if (mine !== token) return;
    const digit = argmax(probs);
    prediction.textContent = `prediction: ${digit}  (p = ${probs[digit].toFixed(3)})`;
    prediction.dataset.digit = String(digit);
    probs.forEach((p, d) => {
      barFills[d][0].style.width = `${(100 * p).toFixed(1)}%`;
      barFills[d][1].textContent = p.toFixed(3);
      barFills[d][0].classList.toggle("wb-top", d === digit);
    });
    const t = await latencyUs(session, [x], 9);
    if (mine === token) latency.textContent = `latency in your browser: ${us(t)} (median of 9 x ${TIMED_BLOCK} runs, one thread)`;
  }

  function pointFromEvent(e) {
    const box = canvas.getBoundingClientRect();
    return [((e.clientX - box.left) * canvas.width) / box.width, ((e.clientY - box.top) * canvas.height) / box.height];
  }
  canvas.addEventListener("pointerdown", (e) => {
    e.preventDefault();
    canvas.setPointerCapture?.(e.pointerId);
    current = [pointFromEvent(e)];
    strokes.push(current);
    redraw();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!current) return;
    current.push(pointFromEvent(e));
    redraw();
  });
  const finish = () => {
    if (!current) return;
    current = null;
    counts = blockCounts(renderStrokes(strokes));
    source.textContent = "your drawing";
    classify();
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  clear.addEventListener("click", () => {
    strokes = [];
    counts = null;
    source.textContent = "";
    redraw();
    classify();
  });
  const showTest = (i) => {
    i = Math.max(0, Math.min(state.inputs.length - 1, Number(i) || 0));
    pick.value = String(i);
    strokes = [];
    redraw();
    counts = state.test.counts[i];
    const py = state.test.predictions[select.value][i];
    source.textContent = `test image ${i}: label ${state.test.labels[i]}; ONNX Runtime in Python predicted ${py}`;
    classify();
  };
  pick.addEventListener("change", () => showTest(pick.value));
  random.addEventListener("click", () => showTest(Math.floor(Math.random() * state.inputs.length)));
  select.addEventListener("change", () => (strokes.length ? classify() : counts ? showTest(pick.value) : classify()));
  redraw();
  classify();
}

// ---- start -------------------------------------------------------------------------------------

async function main() {
  const css = el("link", { rel: "stylesheet", href: new URL("browser.css", HERE).href });
  document.head.append(css);
  const demoRoot = document.getElementById("wb-browser-demo");
  const tableRoot = document.getElementById("wb-browser-table");
  const status = demoRoot || tableRoot;
  try {
    [state.manifest, state.test] = await Promise.all([
      fetchOk(new URL("manifest.json", MODELS), "json"), fetchOk(new URL("test.json", MODELS), "json")]);
  } catch (err) {
    errorLine(status, `Could not load the chapter's models (run notebooks/10_browser.ipynb, then make book): ${err.message}`);
    return;
  }
  try {
    state.ort = await loadRuntime();
  } catch (err) {
    errorLine(status, `Could not load ONNX Runtime Web from _static/browser/ort/ (make book copies it there): ${err.message}`);
    return;
  }
  state.inputs = state.test.counts.map((c) => normalize(c, state.test.mean, state.test.std));
  const rows = tableRoot ? buildTable(tableRoot) : {};
  for (const v of state.manifest.variants) {
    try {
      const bytes = await fetchOk(new URL(v.file, MODELS), "bytes");
      state.sessions[v.name] = await state.ort.InferenceSession.create(bytes, {
        executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    } catch (err) {
      const msg = `Could not load model ${v.file} in this browser: ${String(err.message || err).split("\n")[0]}`;
      if (rows[v.name]) {
        rows[v.name][3].replaceChildren(errorLine(null, msg));
        rows[v.name][3].colSpan = 3;
        rows[v.name][4].remove();
        rows[v.name][5].remove();
      } else errorLine(status, msg);
    }
  }
  if (demoRoot && Object.keys(state.sessions).length) buildDemo(demoRoot);
  else if (demoRoot) errorLine(demoRoot, "No model could be loaded in this browser: nothing to draw with.");
  const measured = [];
  for (const v of state.manifest.variants) {
    if (!state.sessions[v.name]) continue;
    try {
      await evaluateVariant(v, rows[v.name] || Array.from({ length: 7 }, () => el("td")));
      measured.push(v.name);
    } catch (err) {
      errorLine(tableRoot || status, `Model ${v.file} failed on the test split: ${String(err.message || err).split("\n")[0]}`);
    }
  }
  await measureLatencies(measured, rows);
  showRatios();
  const note = tableRoot?.querySelector(".wb-browser-note");
  if (note) {
    note.textContent = `Measured just now by ONNX Runtime Web ${state.ort.env.versions?.web || ""} in your browser: `
      + `WebAssembly, ${state.ort.env.wasm.numThreads} thread, ${state.inputs.length} test images per model; `
      + `latency per image is the median over 15 blocks of ${TIMED_BLOCK} single-image runs, the models taking turns. `
      + `"coded": the Huffman-coded size (chapter 6); "native": ONNX Runtime in Python, p50, when the book was built.`;
  }
}

main()
  .catch((err) => errorLine(document.getElementById("wb-browser-demo") || document.body,
    `The in-browser demo stopped: ${String(err.message || err).split("\n")[0]}`))
  .finally(() => {
    const summary = { results: state.results, errors: state.errors,
      latency_ratio_int8_over_fp32: state.latencyRatioInt8OverFp32 ?? null };
    window.workbenchBrowser.finished = summary;
    resolveDone(summary);
  });
