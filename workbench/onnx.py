"""ONNX export that later quantization can use, the checker, ORT sessions, parity with PyTorch, ORT latency.

Sessions choose execution providers (TensorRT, CUDA, OpenVINO, CoreML, DirectML when installed,
else CPU) and say out loud when ONNX Runtime fell back to another one; :func:`provider_report`
tells which provider ran each node. Thread counts and graph optimization levels
(disabled/basic/extended/all) are session settings; :func:`optimization_levels` compares them.
Quantization with ONNX Runtime, the per-operator profile and the CPU report are in
:mod:`workbench.ort`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from .errors import WorkbenchError
from .measure import LatencyStats, latency

__all__ = ["OPSET", "OPT_LEVELS", "PROVIDERS", "DISABLED_OPTIMIZERS_KEY", "disabled_optimizers", "export",
           "publish_export", "check", "load_onnx", "available_providers", "resolve_providers", "session", "run_session", "Parity", "parity",
           "ort_latency", "profile_events", "ProviderReport", "provider_report", "optimized_graph",
           "optimization_levels"]

OPSET = 18
# A model's metadata can name ORT graph transformers that make it slower (comma-separated); every
# session the workbench opens leaves them out. workbench.ort.quantize writes it (see there why).
DISABLED_OPTIMIZERS_KEY = "workbench.ort.disabled_optimizers"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
OPT_LEVELS = tuple(_OPT_LEVELS)
# Execution providers by short name, in the order "auto" prefers them. Azure's provider runs
# remote operators, not local compute, so "auto" never picks it.
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_INSTALL_HINT = ("onnxruntime-gpu provides CUDA and TensorRT, onnxruntime-openvino OpenVINO, onnxruntime-directml "
                 "DirectML, and the macOS wheel CoreML; providers='auto' takes the best installed one")


@contextlib.contextmanager
def _quiet_exporter():
    # The torch.export-based exporter logs a warning per missing torchvision op and emits
    # FutureWarnings from its internals: noise for a learner, not information.
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export(model: nn.Module, path: str | os.PathLike, *, input_shape: tuple[int, ...], opset: int = OPSET) -> Path:
    """Export `model` to ONNX with a dynamic batch axis (input ``input``, output ``logits``).

    Uses the torch.export-based exporter (torch's default) and then drops ``graph.value_info``:
    the exporter records intermediate shapes there that make onnxruntime's quantization tools
    fail shape inference ("Inferred shape and existing shape differ"); ORT re-infers them anyway.
    The per-node debug annotations the tracer adds are dropped too, so the file size is weights
    and graph only.
    If the new exporter cannot trace the model, the legacy TorchScript exporter is tried, with a
    warning that says why. The file is written atomically and checked with ``onnx.checker``.

    Args:
        model: any module mapping a batch of shape (N, *input_shape) to logits.
        path: destination ``.onnx`` file.
        input_shape: shape of one example, without the batch axis.
        opset: ONNX opset version.

    Returns:
        The path written.

    Example:
        >>> export(model, "model.onnx", input_shape=data.input_shape)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.onnx")
    was_training = model.training
    model.eval()
    # Batch 2, not 1: torch.export specializes a dimension whose example size is 1.
    example = torch.zeros(2, *input_shape)
    try:
        try:
            with _quiet_exporter():
                torch.onnx.export(
                    model, (example,), str(tmp), dynamo=True, opset_version=opset, external_data=False,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                )
        except Exception as exc:
            warnings.warn(
                f"the torch.export-based ONNX exporter failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); falling back to the legacy exporter",
                stacklevel=2,
            )
            with _quiet_exporter():
                torch.onnx.export(
                    model, (example,), str(tmp), dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                )
        publish_export(tmp, path)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    return path


def publish_export(tmp: Path, path: Path, edit: Callable[[onnx.ModelProto], None] | None = None) -> None:
    """The last step of an export: drop the exporter's shape annotations and debug notes from the file the
    exporter wrote at `tmp`, apply `edit` to the graph, save, check and rename it to `path` (atomically)."""
    proto = onnx.load(str(tmp))
    del proto.graph.value_info[:]
    for node in proto.graph.node:  # tracer debug notes (FX node, stack): 20% of a small ViT file
        del node.metadata_props[:]
    if edit is not None:
        edit(proto)
    onnx.save(proto, str(tmp))
    check(tmp)
    os.replace(tmp, path)


def check(path: str | os.PathLike) -> None:
    """Run ``onnx.checker`` (with full shape inference); raise WorkbenchError if the model is invalid."""
    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"ONNX file {str(p)!r} does not exist")
    try:
        onnx.checker.check_model(str(p), full_check=True)
    except Exception as exc:
        raise WorkbenchError(f"{str(p)!r} is not a valid ONNX model: {str(exc).splitlines()[0][:300]}") from None


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file; a clear WorkbenchError if it is missing or not an ONNX model (weights inline)."""
    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"ONNX file {str(p)!r} does not exist")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        model, why = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    else:
        why = "it parses but holds no graph"
    if model is None or not model.graph.node or not model.opset_import:
        raise WorkbenchError(f"could not load {str(p)!r}: it is not an ONNX model ({why}); export one with "
                             "workbench.onnx.export() or `workbench export`")
    return model


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build has (``onnxruntime.get_available_providers()``)."""
    return list(ort.get_available_providers())


def resolve_providers(providers: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Full provider names in priority order, always ending with CPU (ORT's own last resort).

    Args:
        providers: None (CPU), "auto" (every installed accelerator in the order of ``PROVIDERS``,
            then CPU), or names, full ("CUDAExecutionProvider") or short ("cuda").

    Raises:
        WorkbenchError: a requested provider is unknown or not installed; the message lists the
            installed ones.

    Example:
        >>> resolve_providers(["cuda", "cpu"])   # on a CPU-only machine: a WorkbenchError
    """
    installed = available_providers()
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str) and providers.lower() == "auto":
        chosen = [full for full in PROVIDERS.values() if full in installed]
        return chosen if "CPUExecutionProvider" in chosen else chosen + ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    chosen = []
    for name in providers:
        full = PROVIDERS.get(str(name).lower(), name)
        if full not in installed:
            known = "" if full in PROVIDERS.values() or full.endswith("ExecutionProvider") else \
                f" (short names: {', '.join(PROVIDERS)})"
            raise WorkbenchError(
                f"execution provider {name!r} is not installed in this onnxruntime {ort.__version__}{known}; "
                f"available: {', '.join(installed)}. {_INSTALL_HINT}")
        if full not in chosen:
            chosen.append(full)
    return chosen if "CPUExecutionProvider" in chosen else chosen + ["CPUExecutionProvider"]


def disabled_optimizers(model: str | os.PathLike | onnx.ModelProto) -> list[str]:
    """The ORT graph transformers the model's metadata asks sessions to leave out (usually none).

    Example:
        >>> disabled_optimizers("cnn.int8.onnx")
        ['QDQPropagationTransformer']
    """
    proto = model if isinstance(model, onnx.ModelProto) else load_onnx(model)
    value = next((m.value for m in proto.metadata_props if m.key == DISABLED_OPTIMIZERS_KEY), "")
    return [name.strip() for name in value.split(",") if name.strip()]


def session(path: str | os.PathLike, *, threads: int = 1, optimization: str = "all",
            providers: str | list[str] | None = None, optimized_path: str | os.PathLike | None = None,
            profile_prefix: str | None = None, disabled: list[str] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session with a fixed thread count, graph optimization level and providers.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (inter-op is 1: these graphs are sequential).
        optimization: "disabled", "basic", "extended" or "all" (see :func:`optimization_levels`).
        providers: None (CPU), "auto" (best installed), or a list of names in priority order
            (full or short: "tensorrt", "cuda", "openvino", "coreml", "dml", "cpu"); a provider
            that is not installed raises a WorkbenchError listing the installed ones.
        optimized_path: also write the graph as optimized for this session to this file.
        profile_prefix: switch ORT's profiler on, writing ``<prefix>_<date>.json`` on ``end_profiling()``.
        disabled: names of ORT graph transformers to leave out; None takes the list the model's
            metadata gives (:func:`disabled_optimizers`; an int8 model that keeps some layers in
            float carries one), [] runs them all.

    Returns:
        The ``onnxruntime.InferenceSession``. If ORT could not start the first requested provider
        (e.g. CUDA libraries missing) and fell back, a warning says so.

    Example:
        >>> sess = session("model.onnx", threads=2, optimization="basic", providers="auto")
    """
    if optimization not in _OPT_LEVELS:
        raise WorkbenchError(f"unknown optimization level {optimization!r}; known: {', '.join(_OPT_LEVELS)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise WorkbenchError(f"threads must be an integer >= 1, got {threads!r}")
    p = Path(path)
    proto = load_onnx(p)
    chosen = resolve_providers(providers)
    disabled = disabled_optimizers(proto) if disabled is None else list(disabled)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = _OPT_LEVELS[optimization]
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    try:
        sess = ort.InferenceSession(str(p), sess_options=opts, providers=chosen,
                                    disabled_optimizers=disabled or None)
    except Exception as exc:
        raise WorkbenchError(f"ONNX Runtime could not load {str(p)!r}: {str(exc).splitlines()[0][:300]}") from None
    used = sess.get_providers()
    if chosen[0] not in used:
        warnings.warn(f"ONNX Runtime could not start {chosen[0]} and fell back to {', '.join(used)}: "
                      "this session runs on the fallback, not on the provider you asked for", stacklevel=2)
    return sess


def run_session(sess: ort.InferenceSession, X: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Outputs of the session's first output for all rows of X, in batches."""
    arr = X.numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: arr[i:i + batch_size]})[0] for i in range(0, len(arr), batch_size)])


@dataclass(frozen=True)
class Parity:
    """How closely ONNX Runtime reproduces PyTorch on the same inputs."""

    max_abs_err: float
    top1_agreement: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parity(model: nn.Module, onnx_path: str | os.PathLike, X: torch.Tensor, *, batch_size: int = 256) -> Parity:
    """Compare logits of `model` (PyTorch, eval) and the ONNX file (ORT) on every row of X.

    Example:
        >>> p = parity(model, "model.onnx", data.X_test); assert p.top1_agreement == 1.0
    """
    from .train import predict

    ours = run_session(session(onnx_path), X, batch_size)
    ref = predict(model, X, batch_size).numpy()
    if ours.shape != ref.shape:
        raise WorkbenchError(f"ONNX output shape {ours.shape} differs from PyTorch's {ref.shape}")
    return Parity(
        max_abs_err=float(np.max(np.abs(ours - ref))),
        top1_agreement=float(np.mean(ours.argmax(1) == ref.argmax(1))),
        n=len(ref),
    )


def ort_latency(onnx_path: str | os.PathLike, x: torch.Tensor, *, threads: int = 1, warmup: int = 10,
                repeats: int = 100, optimization: str = "all") -> LatencyStats:
    """Latency of one ``session.run`` on batch `x` (ORT, CPU, `threads` intra-op threads)."""
    sess = session(onnx_path, threads=threads, optimization=optimization)
    feed = {sess.get_inputs()[0].name: np.ascontiguousarray(x.numpy(), dtype=np.float32)}
    return latency(lambda: sess.run(None, feed), warmup=warmup, repeats=repeats, threads=threads,
                   batch_size=len(x))


def profile_events(path: str | os.PathLike, x: torch.Tensor | np.ndarray, *, runs: int = 20, warmup: int = 5,
                   threads: int = 1, optimization: str = "all",
                   providers: str | list[str] | None = None) -> list[dict[str, Any]]:
    """ORT's profiler on `runs` calls of batch `x`: one dict per node execution.

    Each dict has ``node`` (the node name in the optimized graph), ``op`` (its operator, e.g.
    QLinearConv after fusion), ``provider``, ``run`` (0-based) and ``us`` (kernel time). Warm-up
    calls are profiled too and dropped here.
    """
    import json
    import tempfile

    arr = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="wb-profile-") as tmp:
        sess = session(path, threads=threads, optimization=optimization, providers=providers,
                       profile_prefix=str(Path(tmp) / "ort"))
        feed = {sess.get_inputs()[0].name: arr}
        for _ in range(warmup + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    return _assign_runs(events, warmup)


def _assign_runs(events: list[dict[str, Any]], warmup: int) -> list[dict[str, Any]]:
    # Each call writes its node events, then one Session "model_run" event when it finishes.
    out, run_index = [], 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            run_index += 1
        elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            out.append({"node": e["name"][:-len("_kernel_time")], "op": e["args"].get("op_name", "?"),
                        "provider": e["args"].get("provider", "?"), "run": run_index - warmup, "us": float(e["dur"])})
    return [row for row in out if row["run"] >= 0]


@dataclass(frozen=True)
class ProviderReport:
    """Which execution provider ONNX Runtime used: asked for, registered, and node by node."""

    requested: list[str]
    session_providers: list[str]
    nodes: dict[str, str]
    fell_back: bool

    def counts(self) -> dict[str, int]:
        """Nodes per provider."""
        out: dict[str, int] = {}
        for provider in self.nodes.values():
            out[provider] = out.get(provider, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"counts": self.counts()}


def provider_report(path: str | os.PathLike, x: torch.Tensor | np.ndarray, *,
                    providers: str | list[str] | None = "auto", threads: int = 1) -> ProviderReport:
    """Run the model once under the profiler and report the provider each node ran on.

    A provider can be registered and still run only part of the graph (nodes it has no kernel
    for go to the next provider, usually CPU, with copies in between): the per-node map shows it.

    Example:
        >>> rep = provider_report("model.onnx", X[:1]); rep.counts()
        {'CPUExecutionProvider': 10}
    """
    requested = resolve_providers(providers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        events = profile_events(path, x, runs=1, warmup=0, threads=threads, providers=providers)
        sess = session(path, threads=threads, providers=providers)
    for w in caught:  # say the fallback once, from here
        warnings.warn(str(w.message), stacklevel=2)
    used = sess.get_providers()
    return ProviderReport(requested=requested, session_providers=used,
                          nodes={row["node"]: row["provider"] for row in events},
                          fell_back=requested[0] not in used)


def optimized_graph(path: str | os.PathLike, optimization: str = "all") -> onnx.ModelProto:
    """The graph as ONNX Runtime runs it at this optimization level (fused nodes included)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="wb-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(path, optimization=optimization, optimized_path=out)
        return onnx.load(str(out))


def optimization_levels(path: str | os.PathLike, x: torch.Tensor | np.ndarray, *, threads: int = 1,
                        rounds: int = 5, repeats: int = 40) -> list[dict[str, Any]]:
    """Compare the four graph optimization levels: nodes left, operators, latency (interleaved).

    Returns:
        One row per level: ``level``, ``nodes``, ``ops`` (operator -> count), ``p50_us``, ``speedup``
        (vs "disabled").

    Example:
        >>> pd.DataFrame(optimization_levels("model.onnx", X[:64]))
    """
    from .measure import side_by_side

    arr = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    sessions = {level: session(path, threads=threads, optimization=level) for level in OPT_LEVELS}
    feeds = {level: {s.get_inputs()[0].name: arr} for level, s in sessions.items()}
    stats = side_by_side({level: (lambda s=s, f=feeds[level]: s.run(None, f)) for level, s in sessions.items()},
                         rounds=rounds, repeats=repeats, threads=threads, batch_size=len(arr))
    rows = []
    for level in OPT_LEVELS:
        graph = optimized_graph(path, level).graph
        ops: dict[str, int] = {}
        for node in graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        rows.append({"level": level, "nodes": len(graph.node), "ops": ops, "p50_us": stats[level].p50_us,
                     "speedup": stats["disabled"].p50_us / stats[level].p50_us})
    return rows
