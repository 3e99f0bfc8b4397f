"""ONNX export that later quantization can use, the checker, ORT sessions, parity with PyTorch, ORT latency."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from .errors import WorkbenchError
from .measure import LatencyStats, latency

__all__ = ["OPSET", "export", "check", "session", "run_session", "Parity", "parity", "ort_latency"]

OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


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
        proto = onnx.load(str(tmp))
        del proto.graph.value_info[:]
        for node in proto.graph.node:  # tracer debug notes (FX node, stack): 20% of a small ViT file
            del node.metadata_props[:]
        onnx.save(proto, str(tmp))
        check(tmp)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    return path


def check(path: str | os.PathLike) -> None:
    """Run ``onnx.checker`` (with full shape inference); raise WorkbenchError if the model is invalid."""
    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"ONNX file {str(p)!r} does not exist")
    try:
        onnx.checker.check_model(str(p), full_check=True)
    except Exception as exc:
        raise WorkbenchError(f"{str(p)!r} is not a valid ONNX model: {str(exc).splitlines()[0][:300]}") from None


def session(path: str | os.PathLike, *, threads: int = 1, optimization: str = "all",
            providers: list[str] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session with a fixed thread count and graph optimization level.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (inter-op is 1: these graphs are sequential).
        optimization: "disabled", "basic", "extended" or "all".
        providers: execution providers in priority order; default CPU.
    """
    if optimization not in _OPT_LEVELS:
        raise WorkbenchError(f"unknown optimization level {optimization!r}; known: {', '.join(_OPT_LEVELS)}")
    if threads < 1:
        raise WorkbenchError(f"threads must be >= 1, got {threads}")
    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"ONNX file {str(p)!r} does not exist")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = _OPT_LEVELS[optimization]
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(p), sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        raise WorkbenchError(f"ONNX Runtime could not load {str(p)!r}: {str(exc).splitlines()[0][:300]}") from None


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
