"""Int8 with ONNX Runtime: dynamic and static QDQ quantization, calibration, an auto mode, and "why isn't it faster?".

* **dynamic**: weights stored as int8; each activation is quantized on the fly with its own
  range (``DynamicQuantizeLinear`` + ``MatMulInteger``). No calibration. Fast for Linear and
  attention layers; for convolutions ORT falls back to the slow ``ConvInteger`` kernel.
* **static QDQ**: weights int8 per output channel, activations uint8 with ranges calibrated on
  real data; the graph carries ``QuantizeLinear``/``DequantizeLinear`` pairs that ORT fuses into
  integer kernels (``QLinearConv``, ``QGemm``) when the graph optimizations are on. Convolutions
  whose dot products are too short for int8 kernels to pay (a stem on 1-3 input channels, a
  depthwise conv) stay in float: see :func:`short_reduction_convs`.
* **auto**: static for models with convolutions, dynamic otherwise (Linear, attention); it times
  the int8 model against fp32 and warns when int8 is slower.

Diagnostics: :func:`op_profile` (per-operator time from ORT's profiler, the share spent in
Quantize/Dequantize nodes) and :func:`cpu_report` (which int8 instruction sets this CPU has).
Affine quantization follows Jacob et al. (2018).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import onnx
import torch

from . import onnx as wonnx
from .errors import WorkbenchError
from .measure import file_bytes, side_by_side

__all__ = ["MODES", "CALIBRATION_METHODS", "ArrayReader", "calibration_reader", "check_calibration", "family",
           "MIN_INT8_REDUCTION", "short_reduction_convs", "Quantized", "quantize", "OpProfile", "op_profile",
           "QDQ_OPS", "cpu_flags", "cpu_report"]

MODES = ("dynamic", "static", "auto")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
_CONV_OPS = ("Conv", "ConvTranspose")
# A convolution's dot products have (input channels / groups) x kernel height x kernel width terms.
# Measured here (AVX-512 VNNI, batch 64, one thread, static QDQ): every conv with fewer than 64
# terms ran slower in int8 than in fp32 (1->32 3x3: 0.24x; 3->32 3x3: 0.45x; 7->32 3x3: 0.74x;
# depthwise 3x3: 0.8-0.9x), every one with 72 or more faster (8->32 3x3: 1.7x; 32->64 3x3: 2.5x).
# Short dot products leave the int8 kernels' wide lanes mostly empty while the float path
# (NCHWc blocks) handles them well.
MIN_INT8_REDUCTION = 64


def _ortq():
    # Imported lazily: onnxruntime.quantization pulls in sympy and more, which most users never need.
    from onnxruntime import quantization

    return quantization


class _NoPreprocessAdvice(logging.Filter):
    # onnxruntime.quantization logs "Please consider to run pre-processing before quantization" on
    # the root logger for every model; the workbench's exports are already what that step makes.
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


# -- calibration data -----------------------------------------------------------------------


def _input_spec(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    init = {i.name for i in model.graph.initializer}
    spec = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in inp.type.tensor_type.shape.dim)
        spec[inp.name] = dims
    return spec


def _shape_text(dims: tuple) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in dims) + ")"


class ArrayReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over an array of examples.

    Args:
        X: examples (N, *input_shape), a torch tensor or numpy array.
        input_name: the model's input name (``input`` for the workbench's exports).
        batch_size: examples per calibration batch.
        limit: use at most this many examples (the first ones).

    Example:
        >>> reader = ArrayReader(data.X_train, limit=512)
    """

    def __init__(self, X: torch.Tensor | np.ndarray, *, input_name: str = wonnx.INPUT_NAME, batch_size: int = 64,
                 limit: int | None = 512) -> None:
        arr = X.numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
        if arr.ndim < 1 or len(arr) == 0:
            raise WorkbenchError(f"calibration needs at least one example, got an array of shape {arr.shape}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise WorkbenchError(f"calibration batch_size must be an integer >= 1, got {batch_size!r}")
        self.X = np.ascontiguousarray(arr[:limit] if limit else arr, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = batch_size
        self.rewind()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.X), self.batch_size):
            yield {self.input_name: self.X[i:i + self.batch_size]}

    def rewind(self) -> None:
        self._it = iter(self)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def check_calibration(model: str | os.PathLike | onnx.ModelProto,
                      batches: Iterable[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Read every calibration batch and check it against the model's inputs (names, rank, fixed dims).

    Returns:
        The batches as float32 numpy feeds.

    Raises:
        WorkbenchError: no batches, or a batch with a wrong input name or shape, named precisely.
    """
    proto = model if isinstance(model, onnx.ModelProto) else wonnx.load_onnx(model)
    spec = _input_spec(proto)
    feeds = []
    for k, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise WorkbenchError(f"calibration batch {k} is a {type(batch).__name__}; each batch must be a dict "
                                 f"{{input name: array}} for the model's inputs {', '.join(spec)}")
        if set(batch) != set(spec):
            raise WorkbenchError(f"calibration batch {k} feeds input(s) {', '.join(map(repr, batch))} but the model's "
                                 f"input(s) are {', '.join(map(repr, spec))}; name the arrays after the model's "
                                 f"inputs (e.g. ArrayReader(X, input_name={next(iter(spec))!r}))")
        feed = {}
        for name, value in batch.items():
            arr = np.ascontiguousarray(value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value),
                                       dtype=np.float32)
            want = spec[name]
            ok = arr.ndim == len(want) and all(not isinstance(d, int) or d == 0 or d == s
                                               for d, s in zip(want, arr.shape))
            if not ok:
                raise WorkbenchError(f"calibration batch {k} for input {name!r} has shape {arr.shape} but the model "
                                     f"expects {_shape_text(want)} (a batch of examples shaped like the training data)")
            feed[name] = arr
        feeds.append(feed)
    if not feeds:
        raise WorkbenchError("the calibration reader gave no batches; static quantization needs real examples")
    return feeds


class _ListReader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


def calibration_reader(onnx_path: str | os.PathLike, X: torch.Tensor | np.ndarray, *, batch_size: int = 64,
                       limit: int | None = 512) -> ArrayReader:
    """An :class:`ArrayReader` named after the model's (single) input, its batches checked against the model.

    Example:
        >>> reader = calibration_reader("model.onnx", data.X_train)
    """
    spec = _input_spec(wonnx.load_onnx(onnx_path))
    if len(spec) != 1:
        raise WorkbenchError(f"calibration_reader builds feeds for one input; the model has {len(spec)}: "
                             f"{', '.join(spec)}. Write a CalibrationDataReader that feeds them all")
    reader = ArrayReader(X, input_name=next(iter(spec)), batch_size=batch_size, limit=limit)
    check_calibration(onnx_path, reader)
    return reader


def _read_all(reader: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(reader, (torch.Tensor, np.ndarray)):
        raise WorkbenchError("internal: arrays are wrapped before reading")
    if hasattr(reader, "get_next"):
        if hasattr(reader, "rewind"):
            reader.rewind()
        return iter(reader.get_next, None)
    return reader


# -- quantization ---------------------------------------------------------------------------


def family(model: str | os.PathLike | onnx.ModelProto) -> str:
    """"conv" if the graph has convolutions, else "linear" (MatMul/Gemm/attention): what auto decides on."""
    proto = model if isinstance(model, onnx.ModelProto) else wonnx.load_onnx(model)
    return "conv" if any(n.op_type in _CONV_OPS for n in proto.graph.node) else "linear"


def short_reduction_convs(model: str | os.PathLike | onnx.ModelProto, *,
                          min_terms: int = MIN_INT8_REDUCTION) -> dict[str, int]:
    """The Conv nodes whose dot products have fewer than `min_terms` terms, by node name.

    A convolution computes, for each output value, a dot product over (input channels / groups)
    x kernel height x kernel width terms. Int8 kernels process those terms in wide blocks; with
    a short reduction (the first conv on 1-3 image channels, a depthwise conv) the blocks are
    mostly padding and the int8 node measures slower than the float one, so static quantization
    keeps such nodes in float (see :data:`MIN_INT8_REDUCTION` for the measurements).

    Returns:
        ``{node name: number of terms}`` for each such Conv node (empty if none).

    Example:
        >>> short_reduction_convs("cnn.onnx")
        {'node_conv2d': 9}
    """
    proto = model if isinstance(model, onnx.ModelProto) else wonnx.load_onnx(model)
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    short = {}
    for node in proto.graph.node:
        if node.op_type != "Conv" or not node.name or len(node.input) < 2 or node.input[1] not in shapes:
            continue  # (an unnamed node cannot be excluded by name)
        weight = shapes[node.input[1]]  # (out channels, in channels / groups, *kernel)
        terms = int(np.prod(weight[1:]))
        if terms < min_terms:
            short[node.name] = terms
    return short


@dataclass(frozen=True)
class Quantized:
    """An int8 ONNX model written by :func:`quantize`, and how it was made."""

    path: str
    mode: str
    fp32_path: str
    fp32_bytes: int
    int8_bytes: int
    per_channel: bool
    reason: str
    speedup: float | None = None
    batch: int | None = None
    ops: dict[str, int] = field(default_factory=dict)
    kept_float: tuple[str, ...] = ()

    @property
    def size_ratio(self) -> float:
        """fp32 file bytes / int8 file bytes (at most about 4)."""
        return self.fp32_bytes / self.int8_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"size_ratio": self.size_ratio}


def _clean_copy(proto: onnx.ModelProto, path: Path) -> Path:
    # onnxruntime.quantization re-runs shape inference and fails on value_info recorded by the
    # torch.export exporter ("Inferred shape and existing shape differ"): drop it, ORT re-infers.
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    del proto.graph.value_info[:]
    onnx.save(proto, str(path))
    return path


def quantize(fp32_path: str | os.PathLike, out_path: str | os.PathLike, *, mode: str = "auto",
             calibration: Any = None, per_channel: bool | None = None, reduce_range: bool = False,
             calibrate_method: str = "minmax", keep_float: str | Iterable[str] | None = "auto",
             check_speed: bool | None = None, batch: int = 64, threads: int = 1) -> Quantized:
    """Quantize an fp32 ONNX model to int8 with ONNX Runtime.

    Args:
        fp32_path: the float model (e.g. from :func:`workbench.onnx.export`).
        out_path: where to write the int8 model.
        mode: "dynamic", "static" (QDQ, activations uint8, weights int8) or "auto" (static for
            models with convolutions, dynamic otherwise).
        calibration: for static: an array of examples (N, *input_shape) (the first 512 are used),
            an ``onnxruntime.quantization.CalibrationDataReader``, or an iterable of
            ``{input name: array}`` batches. Checked against the model's inputs first.
        per_channel: one scale per output channel of each weight; default True for static,
            False for dynamic (ORT's fast dynamic MatMul kernels take per-tensor weights).
        reduce_range: 7-bit weights, for CPUs without VNNI where 8-bit products can saturate
            the 16-bit intermediate sums (see :func:`cpu_report`).
        calibrate_method: "minmax", "percentile" or "entropy".
        keep_float: nodes left in fp32. "auto": for static, the convolutions with too short a
            reduction to gain from int8 (:func:`short_reduction_convs`); for dynamic, none. A list
            of node names keeps exactly those; None (or an empty list) quantizes every node.
            A static model with float nodes names ORT's QDQPropagationTransformer in its metadata
            (:data:`workbench.onnx.DISABLED_OPTIMIZERS_KEY`): :func:`workbench.onnx.session`
            leaves it out, and in your own code pass
            ``onnxruntime.InferenceSession(path, disabled_optimizers=["QDQPropagationTransformer"])``;
            with it, the quantization moves above the next MaxPool and the model runs slower than fp32.
        check_speed: time int8 against fp32 (interleaved, `batch` examples, `threads` threads) and
            warn when int8 is slower; default on for "auto".
        batch: the batch size of that check (zeros shaped like the input unless calibration
            arrays are given).

    Returns:
        A :class:`Quantized` (the path, sizes, chosen mode and why, the measured speedup if checked).

    Example:
        >>> q = quantize("model.onnx", "model.int8.onnx", mode="static", calibration=data.X_train)
        >>> q.size_ratio
        3.9...
    """
    if mode not in MODES:
        raise WorkbenchError(f"unknown ORT quantization mode {mode!r}; known: {', '.join(MODES)}")
    if calibrate_method not in CALIBRATION_METHODS:
        raise WorkbenchError(f"unknown calibration method {calibrate_method!r}; known: {', '.join(CALIBRATION_METHODS)}")
    proto = wonnx.load_onnx(fp32_path)
    fam = family(proto)
    if mode == "auto":
        chosen = "static" if fam == "conv" else "dynamic"
        reason = ("auto: convolutions found, static QDQ (dynamic would run them as slow ConvInteger)"
                  if chosen == "static" else "auto: no convolutions (Linear/attention), dynamic quantization")
        if chosen == "static" and calibration is None:
            raise WorkbenchError("auto chose static quantization for this model (it has convolutions), which needs "
                                 "calibration data: pass calibration=<training examples> (about 500 are enough)")
    else:
        chosen, reason = mode, f"{mode} (as requested)"
    per_channel = (chosen == "static") if per_channel is None else bool(per_channel)
    kept = _kept_float(proto, keep_float, chosen)
    if kept:
        reason += f"; kept in float: {', '.join(kept)}"
        reason += " (reduction too short for int8)" if keep_float == "auto" else ""
    check_speed = (mode == "auto") if check_speed is None else bool(check_speed)
    q = _ortq()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.stem}.tmp-{os.getpid()}.onnx")
    feeds = None
    if calibration is not None:
        if isinstance(calibration, (torch.Tensor, np.ndarray)):
            spec = _input_spec(proto)
            if len(spec) != 1:
                raise WorkbenchError(f"an array of examples calibrates a one-input model; this one has inputs "
                                     f"{', '.join(spec)}: pass a CalibrationDataReader")
            calibration = ArrayReader(calibration, input_name=next(iter(spec)))
        feeds = check_calibration(proto, _read_all(calibration))
    elif chosen == "static":
        raise WorkbenchError("static quantization needs calibration data: pass calibration=<examples> "
                             "(an array, a CalibrationDataReader or {input: array} batches)")
    quiet = _NoPreprocessAdvice()
    logging.getLogger().addFilter(quiet)
    with tempfile.TemporaryDirectory(prefix="wb-ortq-") as tmp:
        src = _clean_copy(proto, Path(tmp) / "fp32.onnx")
        try:
            if chosen == "dynamic":
                q.quantize_dynamic(str(src), str(tmp_out), weight_type=q.QuantType.QInt8, per_channel=per_channel,
                                   reduce_range=reduce_range, nodes_to_exclude=list(kept))
            else:
                method = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
                          "entropy": q.CalibrationMethod.Entropy}[calibrate_method]
                q.quantize_static(str(src), str(tmp_out), _ListReader(feeds), quant_format=q.QuantFormat.QDQ,
                                  per_channel=per_channel, reduce_range=reduce_range,
                                  activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                                  calibrate_method=method, nodes_to_exclude=list(kept))
            written = onnx.load(str(tmp_out))
            if kept and chosen == "static":
                _disable_qdq_propagation(written)
                onnx.save(written, str(tmp_out))
            os.replace(tmp_out, out)
        except WorkbenchError:
            raise
        except Exception as exc:
            raise WorkbenchError(f"ONNX Runtime could not quantize {str(fp32_path)!r} ({chosen}): "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
        finally:
            logging.getLogger().removeFilter(quiet)
            Path(tmp_out).unlink(missing_ok=True)
    ops: dict[str, int] = {}
    for node in written.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    speedup = None
    if check_speed:
        x = feeds[0][next(iter(feeds[0]))] if feeds else None
        speedup = _speedup(fp32_path, out, x, proto, batch=batch, threads=threads)
        if speedup < 1.0:
            warnings.warn(
                f"the int8 model ({chosen}) measured {1 / speedup:.1f}x SLOWER than fp32 at batch {batch} on "
                f"{threads} thread(s)"
                + (": dynamic quantization runs convolutions as ConvInteger, which is slow; use mode='static'"
                   if chosen == "dynamic" and fam == "conv" else
                   ": see op_profile() for where the time goes and cpu_report() for the CPU's int8 support")
                + ". Keep the fp32 model or change the mode.", stacklevel=2)
    return Quantized(path=str(out), mode=chosen, fp32_path=str(fp32_path), fp32_bytes=file_bytes(fp32_path),
                     int8_bytes=file_bytes(out), per_channel=per_channel, reason=reason, speedup=speedup,
                     batch=batch if check_speed else None, ops=ops, kept_float=kept)


# ORT's QDQPropagationTransformer moves a QuantizeLinear up across value-preserving ops. Where
# a float conv feeds ReLU -> MaxPool -> int8 conv, it lifts the quantization above the MaxPool,
# which then runs on a generic uint8 NCHW kernel: measured here, the CNN with its first conv in
# float ran 0.57x of fp32 with the transformer and 2.4x without it (all-int8: 1.36x either way).
_PROPAGATION = "QDQPropagationTransformer"


def _disable_qdq_propagation(model: onnx.ModelProto) -> None:
    entry = next((m for m in model.metadata_props if m.key == wonnx.DISABLED_OPTIMIZERS_KEY), None)
    if entry is None:
        entry = model.metadata_props.add()
        entry.key = wonnx.DISABLED_OPTIMIZERS_KEY
    entry.value = _PROPAGATION


def _kept_float(proto: onnx.ModelProto, keep_float: str | Iterable[str] | None, mode: str) -> tuple[str, ...]:
    if keep_float is None:
        return ()
    if isinstance(keep_float, str):
        if keep_float != "auto":
            raise WorkbenchError(f"keep_float must be 'auto', None or a list of node names, got {keep_float!r}")
        return tuple(short_reduction_convs(proto)) if mode == "static" else ()
    names = tuple(keep_float)
    known = [n.name for n in proto.graph.node]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise WorkbenchError(f"keep_float names node(s) {', '.join(map(repr, unknown))} that the model does not have; "
                             f"its nodes are: {', '.join(known[:40])}{' ...' if len(known) > 40 else ''}")
    return names


def _speedup(fp32: str | os.PathLike, int8: str | os.PathLike, x: np.ndarray | None, proto: onnx.ModelProto, *,
             batch: int, threads: int) -> float:
    if x is None or len(x) < batch:
        dims = next(iter(_input_spec(proto).values()))
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in dims[1:]]
        x = np.zeros((batch, *shape), dtype=np.float32)
    x = np.ascontiguousarray(x[:batch], dtype=np.float32)
    sessions = {"fp32": wonnx.session(fp32, threads=threads), "int8": wonnx.session(int8, threads=threads)}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    stats = side_by_side({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()},
                         rounds=3, repeats=20 if batch > 8 else 100, threads=threads, batch_size=batch)
    return stats["fp32"].p50_us / stats["int8"].p50_us


# -- "why isn't it faster?" -----------------------------------------------------------------


@dataclass(frozen=True)
class OpProfile:
    """Per-node kernel times from ORT's profiler, averaged over the profiled runs (microseconds)."""

    nodes: list[dict[str, Any]]
    runs: int

    @property
    def total_us(self) -> float:
        """Kernel time of one run (summed over nodes; a little below the wall time of a call)."""
        return float(sum(n["us"] for n in self.nodes))

    def by_op(self) -> list[dict[str, Any]]:
        """One row per operator type, slowest first: ``op``, ``nodes``, ``us``, ``share``."""
        ops: dict[str, dict[str, Any]] = {}
        for n in self.nodes:
            row = ops.setdefault(n["op"], {"op": n["op"], "nodes": 0, "us": 0.0})
            row["nodes"] += 1
            row["us"] += n["us"]
        total = self.total_us or 1.0
        return sorted(({**r, "share": r["us"] / total} for r in ops.values()), key=lambda r: -r["us"])

    @property
    def qdq_share(self) -> float:
        """Fraction of kernel time in QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear nodes."""
        total = self.total_us
        return float(sum(n["us"] for n in self.nodes if n["op"] in QDQ_OPS) / total) if total else 0.0

    def table(self):
        """:meth:`by_op` as a pandas DataFrame indexed by operator."""
        import pandas as pd

        return pd.DataFrame(self.by_op()).set_index("op")


def op_profile(path: str | os.PathLike, x: torch.Tensor | np.ndarray, *, runs: int = 20, warmup: int = 5,
               threads: int = 1, optimization: str = "all") -> OpProfile:
    """Where one call's time goes, operator by operator (ORT's profiler, graph as optimized).

    Example:
        >>> prof = op_profile("model.int8.onnx", X[:64]); prof.table(); prof.qdq_share
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise WorkbenchError(f"runs must be an integer >= 1, got {runs!r}")
    events = wonnx.profile_events(path, x, runs=runs, warmup=warmup, threads=threads, optimization=optimization)
    nodes: dict[str, dict[str, Any]] = {}
    for e in events:
        row = nodes.setdefault(e["node"], {"node": e["node"], "op": e["op"], "provider": e["provider"], "us": 0.0})
        row["us"] += e["us"] / runs
    return OpProfile(nodes=list(nodes.values()), runs=runs)


# What each instruction set means for int8 inference (x86; ORT's MLAS kernels pick the best one).
_ISA = {
    "avx2": ("AVX2", "256-bit integer SIMD: int8 dot products take three instructions (vpmaddubsw, vpmaddwd, "
                     "vpaddd) and the 16-bit intermediate can saturate, hence reduce_range on such CPUs"),
    "avx512f": ("AVX-512", "512-bit SIMD: twice the lanes of AVX2 for fp32 and int8 alike"),
    "avx512_vnni": ("AVX-512 VNNI", "one instruction (vpdpbusd) multiplies uint8 x int8 and accumulates in int32: "
                                    "the fast, saturation-free int8 path (U8S8: activations uint8, weights int8)"),
    "avx_vnni": ("AVX-VNNI", "the same VNNI instruction on 256-bit registers (client CPUs without AVX-512)"),
    "amx_int8": ("AMX-INT8", "tile matrix units (Sapphire Rapids and later): int8 matrix products many times "
                             "faster again, for large enough matrices"),
}


def cpu_flags() -> dict[str, bool]:
    """Which int8-relevant x86 instruction sets this CPU reports (Linux /proc/cpuinfo; empty elsewhere).

    Keys: avx2, avx512f, avx512_vnni, avx_vnni, amx_int8.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {name: name in flags for name in _ISA}


def cpu_report() -> list[dict[str, Any]]:
    """The CPU's int8-relevant instruction sets, whether present, and what each means for int8.

    On a non-Linux machine (no /proc/cpuinfo) ``present`` is None: unknown.

    Example:
        >>> pd.DataFrame(cpu_report()).set_index("instruction set")
    """
    flags = cpu_flags()
    return [{"instruction set": label, "flag": key, "present": flags.get(key) if flags else None,
             "what it means for int8": meaning} for key, (label, meaning) in _ISA.items()]
