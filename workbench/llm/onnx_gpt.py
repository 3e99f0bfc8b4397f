"""Large models, part 2: the GPT in ONNX Runtime: one graph with past and present keys/values (so a generation
loop runs over an ORT session with a KV cache), int4 weight-only quantization through ORT's MatMulNBits (RTN
and GPTQ), bits per character through ORT, and decoding speed against torch as the model grows.

The graph (:func:`export_gpt`) has inputs ``input_ids`` (batch, new_tokens) and, for every layer i,
``past_key_i`` / ``past_value_i`` (batch, heads, past_len, head_dim) with past_len >= 0 (an empty past is a
(B, H, 0, D) array); outputs ``logits`` (batch, new_tokens, vocab) and ``present_key_i`` / ``present_value_i``
(the past with the new positions appended). Position ids are *not* an input: the graph takes past_len from
``past_key_0``'s shape and gives new token j the position past_len + j, and new token j attends to keys
0 .. past_len + j (the offset causal mask of :meth:`workbench.llm.GPT.step`), so one graph serves the
prefill (past_len 0, T tokens), single-token steps and multi-token chunks after a cache.

Example:
    >>> from workbench import llm
    >>> from workbench.llm import onnx_gpt as og
    >>> t = llm.pretrained()
    >>> og.export_gpt(t.model, "gpt.onnx"); og.quantize_int4("gpt.onnx", "gpt.int4.onnx")
    >>> m = og.OrtGPT("gpt.int4.onnx"); ids = t.tokenizer.encode("def ")
    >>> t.tokenizer.decode(og.generate_tokens_ort(m, ids, 64))
    >>> og.evaluate_bpc_ort(m, t.corpus.ids("val")).bits_per_char
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from ..errors import WorkbenchError
from ..measure import torch_threads
from ..onnx import OPSET, _quiet_exporter, check, load_onnx, publish_export, session
from .calib import block_linears
from .decode import _check_prompt, _check_sampling, generate_tokens
from .gpt import GPT, GPTConfig, KVCache
from .trainer import BPC, eval_windows

__all__ = ["CONFIG_KEY", "INT4_KEY", "input_names", "output_names", "export_gpt", "OrtGPT", "generate_tokens_ort",
           "evaluate_bpc_ort", "quantize_int4", "Int4Size", "int4_size", "dequantize_int4", "decode_speed",
           "width_sweep", "cpu_caches"]

CONFIG_KEY = "workbench.gpt_config"  # metadata: the GPTConfig as JSON (OrtGPT rebuilds it from the file)
INT4_KEY = "workbench.int4"          # metadata of a quantized file: method, block size, symmetry
_LM_HEAD = "lm_head"


def input_names(n_layer: int) -> list[str]:
    """``input_ids``, then ``past_key_i``, ``past_value_i`` for every layer i."""
    return ["input_ids"] + [f"past_{kv}_{i}" for i in range(n_layer) for kv in ("key", "value")]


def output_names(n_layer: int) -> list[str]:
    """``logits``, then ``present_key_i``, ``present_value_i`` for every layer i."""
    return ["logits"] + [f"present_{kv}_{i}" for i in range(n_layer) for kv in ("key", "value")]


class _StepGraph(nn.Module):
    """GPT.step as one traceable function: no Python branch on the cache length (GPT.step picks an SDPA call by
    past_len and new_tokens; a graph needs one form for all). Holds the GPT's own modules, so the exported
    initializers keep the state_dict names (``blocks.0.ln_1.weight`` ...)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.cfg = model.config
        self.wte, self.wpe, self.blocks, self.ln_f, self.lm_head = (model.wte, model.wpe, model.blocks, model.ln_f,
                                                                     model.lm_head)

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        b, t = input_ids.shape
        d, nh = self.cfg.n_embd, self.cfg.n_head
        hd = d // nh
        s = past[0].shape[2]
        pos = torch.arange(t) + s
        x = self.wte(input_ids) + self.wpe(pos)
        see = torch.arange(s + t)[None, :] <= pos[:, None]  # (t, s + t): token j sees keys 0 .. s + j
        presents: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.attn.qkv(blk.ln_1(x)).split(d, dim=2)
            q, k, v = (z.reshape(b, t, nh, hd).transpose(1, 2) for z in (q, k, v))
            k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            y = att.masked_fill(~see, float("-inf")).softmax(-1) @ v
            x = x + blk.attn.proj(y.transpose(1, 2).reshape(b, t, d))
            x = x + blk.mlp(blk.ln_2(x))
        return (self.lm_head(self.ln_f(x)), *presents)


def _linears(model: GPT) -> dict[str, nn.Linear]:
    return {**block_linears(model), _LM_HEAD: model.lm_head}


def _name_linears(proto: onnx.ModelProto, model: GPT) -> None:
    """Name each Linear's MatMul after its module (``blocks.0.attn.qkv``, ``lm_head``) and its weight
    ``<module>.weight_t``: the exporter numbers them (``node_MatMul_20``, ``val_21``), and quantization and
    :func:`dequantize_int4` need to know which is which. Matched by value: a Linear's weight is either a
    folded, transposed initializer of the MatMul, or (a tied head, shared with the embedding's Gather; folded
    or not depending on its size) a Transpose node of the embedding."""
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    wanted = {name: lin.weight.detach().contiguous().numpy() for name, lin in _linears(model).items()}
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        b, src = node.input[1], producer.get(node.input[1])
        if b in inits:
            arr = numpy_helper.to_array(inits[b]).T
        elif src is not None and src.op_type == "Transpose" and src.input[0] in inits:
            arr = numpy_helper.to_array(inits[src.input[0]])
        else:
            continue
        hit = next((n for n, w in wanted.items() if w.shape == arr.shape and np.array_equal(w, arr)), None)
        if hit is None:
            continue
        del wanted[hit]
        node.name = hit
        if b in inits:
            inits[b].name = node.input[1] = f"{hit}.weight_t"
    if wanted:
        raise WorkbenchError(f"the exported graph has no MatMul for {', '.join(wanted)}: the exporter changed how it "
                             "writes Linear layers; update workbench.llm.onnx_gpt._name_linears")


def export_gpt(model: GPT, path: str | os.PathLike, *, opset: int = OPSET) -> Path:
    """Export the GPT's incremental forward to ONNX: past keys/values in, logits and present keys/values out.

    torch's torch.export-based exporter (as :func:`workbench.onnx.export`), dynamic batch, new_tokens and
    past_len (examples of 2, 3 and 4: torch.export specializes a dimension whose example is 0 or 1, yet the
    graph runs with past_len 0). ``graph.value_info`` and the tracer's per-node notes are dropped (the first
    breaks onnxruntime.quantization's shape inference), each Linear's MatMul is named after its module, and
    the GPTConfig is stored in the metadata under ``CONFIG_KEY``. Written atomically and checked.

    Args:
        model: the GPT (put in eval mode for the export, its mode restored after).
        path: destination ``.onnx``.
        opset: ONNX opset version.

    Returns:
        The path written.

    Example:
        >>> export_gpt(t.model, "gpt.onnx"); OrtGPT("gpt.onnx").step(t.tokenizer.encode("def ")[None])
    """
    if not isinstance(model, GPT):
        raise WorkbenchError(f"export_gpt exports a workbench.llm.GPT, got {type(model).__name__}")
    cfg = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.onnx")
    hd = cfg.n_embd // cfg.n_head
    ids = torch.zeros(2, 3, dtype=torch.long)
    past = tuple(torch.zeros(2, cfg.n_head, 4, hd) for _ in range(2 * cfg.n_layer))
    batch, new, plen = torch.export.Dim("batch"), torch.export.Dim("new_tokens"), torch.export.Dim("past_len", min=0)
    shapes = ({0: batch, 1: new}, tuple({0: batch, 2: plen} for _ in past))
    was_training = model.training
    model.eval()
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(_StepGraph(model), (ids, past), str(tmp), dynamo=True, opset_version=opset,
                              external_data=False, input_names=input_names(cfg.n_layer),
                              output_names=output_names(cfg.n_layer), dynamic_shapes=shapes, verbose=False)
        def name_and_describe(proto: onnx.ModelProto) -> None:
            _name_linears(proto, model)
            onnx.helper.set_model_props(proto, {CONFIG_KEY: json.dumps(cfg.to_dict())})

        publish_export(tmp, path, name_and_describe)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    return path


class OrtGPT:
    """An exported GPT in an ONNX Runtime session, stepped like :meth:`workbench.llm.GPT.step`.

    The cache is a :class:`workbench.llm.KVCache` of torch tensors that share memory with ORT's outputs, so a
    cache from ``GPT.step`` continues here and the other way round.

    Example:
        >>> m = OrtGPT("gpt.onnx"); logits, cache = m.step(ids[None]); logits, cache = m.step(nxt, cache)
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 1, optimization: str = "all"):
        self.path = Path(path)
        self.session = session(self.path, threads=threads, optimization=optimization)
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in meta:
            raise WorkbenchError(f"{str(self.path)!r} has no GPT configuration in its metadata: it was not written "
                                 "by workbench.llm.onnx_gpt.export_gpt (or quantize_int4); export the model with it")
        self.config = GPTConfig(**json.loads(meta[CONFIG_KEY]))
        self.int4 = json.loads(meta[INT4_KEY]) if INT4_KEY in meta else None
        want = input_names(self.config.n_layer)
        got = [i.name for i in self.session.get_inputs()]
        if got != want:
            raise WorkbenchError(f"{str(self.path)!r} has inputs {got[:3]}..., expected {want[:3]}...; re-export it "
                                 "with export_gpt")
        self._outputs = output_names(self.config.n_layer)
        self._past_names = want[1:]
        self._head_dim = self.config.n_embd // self.config.n_head

    def __repr__(self) -> str:
        return f"OrtGPT({str(self.path)!r}, {self.config}, int4={self.int4})"

    def _check_past(self, past: KVCache, batch: int) -> None:
        cfg = self.config
        if not isinstance(past, KVCache):
            raise WorkbenchError(f"past must be a workbench.llm.KVCache (from a previous step) or None, "
                                 f"got {type(past).__name__}")
        if len(past.layers) != cfg.n_layer:
            raise WorkbenchError(f"the cache has {len(past.layers)} layers but the model has {cfg.n_layer}: "
                                 "it came from another model")
        k0 = past.layers[0][0]
        want = (batch, cfg.n_head, k0.shape[2] if isinstance(k0, torch.Tensor) and k0.dim() == 4 else "past_len",
                self._head_dim)
        for i, (k, v) in enumerate(past.layers):
            for what, z in (("keys", k), ("values", v)):
                if not isinstance(z, torch.Tensor) or tuple(z.shape) != want or z.dtype != torch.float32:
                    raise WorkbenchError(f"layer {i}'s cached {what} have shape {tuple(getattr(z, 'shape', ()))} "
                                         f"({getattr(z, 'dtype', type(z).__name__)}), "
                                         f"expected float32 {want} (batch, heads, past_len, head_dim)")

    def step(self, ids: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T, vocab) of the new tokens `ids` (B, T) placed after `past`, and the cache with them.

        Example:
            >>> logits, cache = m.step(prompt[None]); logits, cache = m.step(logits[:, -1:].argmax(-1), cache)
        """
        cfg = self.config
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise WorkbenchError("ids must be an int64 tensor of shape (batch, new_tokens)")
        b, t = ids.shape
        if t < 1:
            raise WorkbenchError("step needs at least one new token, got an empty (B, 0) tensor")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise WorkbenchError(f"token ids must be in [0, {cfg.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        if past is not None:
            self._check_past(past, b)
        s = past.length if past is not None else 0
        if s + t > cfg.block_size:
            raise WorkbenchError(f"{s} cached + {t} new positions exceed the context length {cfg.block_size}; "
                                 f"re-prefill from the last {cfg.block_size} tokens or fewer")
        feed = {"input_ids": np.ascontiguousarray(ids.numpy())}
        if past is None:
            empty = np.zeros((b, cfg.n_head, 0, self._head_dim), np.float32)
            tensors = [empty] * (2 * cfg.n_layer)
        else:
            tensors = [np.ascontiguousarray(z.detach().numpy()) for kv in past.layers for z in kv]
        feed.update(zip(self._past_names, tensors))
        out = self.session.run(self._outputs, feed)
        present = [torch.from_numpy(a) for a in out[1:]]
        return torch.from_numpy(out[0]), KVCache(tuple(zip(present[0::2], present[1::2])))

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The full forward (empty past): logits (B, T, vocab), as ``GPT(ids)``."""
        return self.step(ids)[0]


def generate_tokens_ort(model: OrtGPT, ids: torch.Tensor, max_new_tokens: int, *,
                        return_cache: bool = False) -> torch.Tensor | tuple[torch.Tensor, KVCache | None]:
    """Greedy continuation of `ids` through ONNX Runtime with the KV cache: :func:`workbench.llm.generate_tokens`
    (``use_cache=True``, temperature 0) with ORT in place of torch, including the re-prefill from the last
    ``block_size`` tokens once the context is full.

    Args:
        model: an :class:`OrtGPT`.
        ids: prompt token ids, (T,) or (B, T) with 1 <= T <= block_size.
        max_new_tokens: how many tokens to add (0 gives an empty result).
        return_cache: also return the final cache.

    Returns:
        The new tokens, (max_new_tokens,) or (B, max_new_tokens) like `ids`; with `return_cache`, a pair.

    Example:
        >>> t.tokenizer.decode(generate_tokens_ort(OrtGPT("gpt.onnx"), t.tokenizer.encode("def "), 64))
    """
    if not isinstance(model, OrtGPT):
        raise WorkbenchError(f"generate_tokens_ort runs an OrtGPT, got {type(model).__name__}; "
                             "for a torch GPT use workbench.llm.generate_tokens")
    _check_sampling(max_new_tokens, 0.0, None)
    squeeze = isinstance(ids, torch.Tensor) and ids.dim() == 1
    seq = _check_prompt(model, ids)
    block = model.config.block_size
    out, cache = [], None
    if max_new_tokens:
        logits, cache = model.step(seq)
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        seq = torch.cat([seq, nxt], dim=1)
        if i + 1 < max_new_tokens:
            if cache.length < block:
                logits, cache = model.step(nxt, cache)
            else:
                logits, cache = model.step(seq[:, -block:])
    new = torch.cat(out, dim=1) if out else seq.new_zeros(seq.shape[0], 0)
    new = new[0] if squeeze else new
    return (new, cache) if return_cache else new


def evaluate_bpc_ort(model: OrtGPT, ids: torch.Tensor, *, batch_size: int = 64, max_chars: int | None = None) -> BPC:
    """Bits per character through ONNX Runtime: :func:`workbench.llm.evaluate_bpc`'s non-overlapping
    full-context windows, each run through the same graph with an empty past.

    Example:
        >>> evaluate_bpc_ort(OrtGPT("gpt.int4.onnx"), t.corpus.ids("val")).bits_per_char
    """
    x, y = eval_windows(ids, model.config.block_size, max_chars)
    total = 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].flatten(), reduction="sum"))
    nats = total / y.numel()
    return BPC(bits_per_char=nats / math.log(2), perplexity=math.exp(nats), chars=y.numel())


# ---------------------------------------------------------------------------------------------------------------
# int4 weight-only through MatMulNBits


class _CalibReader:
    """ORT's CalibrationDataReader protocol (get_next / iteration) over token ids (sequences, length): one
    sequence per feed, empty past. ORT's GPTQ deep-copies the reader and iterates the copy."""

    def __init__(self, calib: torch.Tensor, config: GPTConfig):
        empty = np.zeros((1, config.n_head, 0, config.n_embd // config.n_head), np.float32)
        names = input_names(config.n_layer)
        self.feeds = [{names[0]: row[None].numpy().astype(np.int64), **{n: empty for n in names[1:]}} for row in calib]
        self.at = 0

    def get_next(self) -> dict | None:
        if self.at >= len(self.feeds):
            return None
        self.at += 1
        return self.feeds[self.at - 1]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


@contextlib.contextmanager
def _quiet_quantizer():
    # ORT's quantizer module calls logging.basicConfig(level=INFO) on import and its GPTQ/RTN code prints a
    # progress bar: keep both off the learner's screen.
    names = ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor", "root")
    loggers = [logging.getLogger(n if n != "root" else None) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantize_int4(src: str | os.PathLike, dst: str | os.PathLike, *, method: str = "rtn", block_size: int = 32,
                  symmetric: bool = True, calib: torch.Tensor | None = None, include_lm_head: bool = False,
                  accuracy_level: int | None = None) -> Path:
    """int4 weight-only quantization of an :func:`export_gpt` file with ORT's ``MatMulNBitsQuantizer``.

    Every MatMul with a constant weight becomes a ``com.microsoft.MatMulNBits`` node: 4-bit codes packed two
    per byte, one float32 scale per `block_size` input rows of each output column, and (asymmetric only) a
    4-bit zero point per block. The LM head stays float unless `include_lm_head` (as in
    :func:`workbench.llm.quantize_weights`; with a tied head it is the embedding, so keeping it lets the bpc be
    compared). ORT applies ``nodes_to_exclude`` to RTN only, so the head is kept out by routing its weight
    through an Identity node (the quantizers take only MatMuls whose weight is an initializer) that is removed
    again afterwards.

    ORT's "symmetric" is not workbench's: codes are unsigned 0..15 with the fixed zero point 8 and the scale
    ``2 max|w| / 15`` (16 levels spread over the range, so +max|w| clips to ``7/7.5`` of itself), where
    workbench uses signed codes with ``S = max|w| / 7`` (15 levels used, the extremes exact).

    Args:
        src: the float ``.onnx`` from :func:`export_gpt`. dst: where the int4 model goes.
        method: "rtn" (``RTNWeightOnlyQuantConfig``) or "gptq" (``GPTQWeightOnlyQuantConfig``: needs `calib`).
        block_size: input rows per scale (MatMulNBits needs a power of two >= 16).
        symmetric: no zero points (see above) or asymmetric min-max with a zero point per block.
        calib: token ids (sequences, length) from the train split (e.g. ``llm.calibration_ids(corpus)``), GPTQ only.
        include_lm_head: quantize the LM head too.
        accuracy_level: MatMulNBits' compute type (None/0 unset = float32 on CPU; 4 = int8 activations, faster).

    Returns:
        The path written.

    Example:
        >>> quantize_int4("gpt.onnx", "gpt.gptq.onnx", method="gptq", calib=llm.calibration_ids(t.corpus))
    """
    with _quiet_quantizer():
        from onnxruntime.quantization.matmul_nbits_quantizer import (GPTQWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer,
                                                                     RTNWeightOnlyQuantConfig)
    if method not in ("rtn", "gptq"):
        raise WorkbenchError(f"unknown int4 method {method!r}; known: rtn, gptq")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or \
            block_size & (block_size - 1):
        raise WorkbenchError(f"block_size must be a power of two >= 16 (MatMulNBits' kernels), got {block_size!r}")
    proto = load_onnx(src)
    meta = {p.key: p.value for p in proto.metadata_props}
    if CONFIG_KEY not in meta:
        raise WorkbenchError(f"{str(src)!r} was not written by export_gpt (no GPT configuration in its metadata)")
    config = GPTConfig(**json.loads(meta[CONFIG_KEY]))
    if method == "gptq":
        if calib is None:
            raise WorkbenchError("GPTQ needs a calibration set: pass calib=llm.calibration_ids(corpus)")
        if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or not len(calib) or \
                not 1 <= calib.shape[1] <= config.block_size:
            raise WorkbenchError(f"calib must be token ids of shape (sequences, length <= {config.block_size})")
        algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=_CalibReader(calib, config))
    else:
        algo = RTNWeightOnlyQuantConfig()
    if not symmetric:
        # ORT packs the 4-bit zero points two per byte across the whole (N, K / block) array and then reshapes
        # it to N rows: with an odd number of blocks per row that fails (or would mix rows). Say so up front.
        for node in proto.graph.node:
            w = next((i for i in proto.graph.initializer if i.name == node.input[1]), None) \
                if node.op_type == "MatMul" and (include_lm_head or node.name != _LM_HEAD) else None
            if w is not None and len(w.dims) == 2 and -(-w.dims[0] // block_size) % 2:
                raise WorkbenchError(f"asymmetric int4 needs an even number of blocks per column, but {node.name!r} "
                                     f"has {w.dims[0]} inputs = {-(-w.dims[0] // block_size)} blocks of {block_size} "
                                     "(ORT's zero-point packing); use symmetric=True or a width divisible by "
                                     f"{2 * block_size}")
    keep = None
    head = next((n for n in proto.graph.node if n.name == _LM_HEAD), None)
    inits = {i.name: i for i in proto.graph.initializer}
    if head is not None and not include_lm_head and head.input[1] in inits:
        keep = head.input[1] + ".keep_float"
        proto.graph.node.insert(0, onnx.helper.make_node("Identity", [head.input[1]], [keep], name=keep))
        head.input[1] = keep
    elif head is not None and include_lm_head and head.input[1] not in inits:
        # a tied head reads Transpose(embedding): give it its own transposed copy to quantize
        src = next(n for n in proto.graph.node if head.input[1] in n.output)
        w = numpy_helper.to_array(inits[src.input[0]]).T
        proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), f"{_LM_HEAD}.weight_t"))
        head.input[1] = f"{_LM_HEAD}.weight_t"
    with _quiet_quantizer():
        q = MatMulNBitsQuantizer(proto, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, algo_config=algo)
        q.process()
    out = q.model.model
    if keep is not None:  # take the Identity out again
        ident = next(n for n in out.graph.node if n.name == keep)
        for n in out.graph.node:
            n.input[:] = [ident.input[0] if x == keep else x for x in n.input]
        out.graph.node.remove(ident)
    del out.graph.value_info[:]
    if not any(o.domain == "com.microsoft" for o in out.opset_import):  # ORT's RTN/GPTQ path leaves it out
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.helper.set_model_props(out, {CONFIG_KEY: meta[CONFIG_KEY], INT4_KEY: json.dumps(
        {"method": method, "block_size": block_size, "symmetric": symmetric, "include_lm_head": include_lm_head,
         "accuracy_level": accuracy_level})})
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.tmp-{os.getpid()}.onnx")
    try:
        onnx.save(out, str(tmp))
        check(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


@dataclass(frozen=True)
class Int4Size:
    """The quantized Linear weights before and after: float32 bytes (K x N x 4 per MatMulNBits node) and the
    bytes MatMulNBits stores (packed codes, scales, zero points), and what stayed float (the LM head)."""

    nodes: int
    fp32_bytes: int
    int4_bytes: int
    float_matmul_bytes: int

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.int4_bytes

    @property
    def bits_per_weight(self) -> float:
        return 32 / self.ratio

    def to_dict(self) -> dict:
        return asdict(self) | {"ratio": self.ratio, "bits_per_weight": self.bits_per_weight}


def int4_size(path: str | os.PathLike) -> Int4Size:
    """Bytes of the quantized weights of an int4 file against their float32 size.

    Example:
        >>> int4_size("gpt.int4.onnx").ratio     # 32 / (4 + 32/32) = 6.4 at block 32, symmetric
    """
    proto = load_onnx(path)
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    nodes = fp32 = packed = kept = 0
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            nodes += 1
            fp32 += 4 * attrs["K"] * attrs["N"]
            packed += sum(numpy_helper.to_array(inits[x]).nbytes for x in node.input[1:] if x in inits)
        elif node.op_type == "MatMul" and node.name == _LM_HEAD:  # its weight: an initializer or Transpose(one)
            src = node.input[1] if node.input[1] in inits else producer[node.input[1]].input[0]
            kept += numpy_helper.to_array(inits[src]).nbytes
    if not nodes:
        raise WorkbenchError(f"{str(path)!r} has no MatMulNBits nodes: quantize it with quantize_int4 first")
    return Int4Size(nodes=nodes, fp32_bytes=fp32, int4_bytes=packed, float_matmul_bytes=kept)


def dequantize_int4(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The float weights the MatMulNBits nodes compute with, by module name, shaped as ``nn.Linear.weight``
    (out, in): ``scale * (code - zero_point)``, zero point 8 when the node has none.

    Loading them into a copy of the GPT gives the torch model the int4 ORT model should reproduce.

    Example:
        >>> w = dequantize_int4("gpt.int4.onnx"); w["blocks.0.mlp.fc"].shape   # (4 n_embd, n_embd)
    """
    proto = load_onnx(path)
    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        k, n, bits, bs = a["K"], a["N"], a["bits"], a["block_size"]
        if bits != 4:
            raise WorkbenchError(f"node {node.name!r} has {bits}-bit weights; dequantize_int4 reads 4-bit ones")
        blocks = -(-k // bs)
        raw = numpy_helper.to_array(inits[node.input[1]]).reshape(n, blocks, bs // 2)
        codes = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(n, blocks, bs).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks, 1).astype(np.float32)
        if len(node.input) > 3 and node.input[3]:
            zp = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1)
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks, None].astype(np.float32)
        else:
            zp = np.float32(8)
        w = ((codes - zp) * scale).reshape(n, blocks * bs)[:, :k]
        name = node.name[:-len("_Q4")] if node.name.endswith("_Q4") else node.name
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    if not out:
        raise WorkbenchError(f"{str(path)!r} has no MatMulNBits nodes: quantize it with quantize_int4 first")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Decoding speed


def decode_speed(model: GPT, ids: torch.Tensor, new_tokens: int = 64, *,
                 fp32: OrtGPT | str | os.PathLike | None = None, int4: OrtGPT | str | os.PathLike | None = None,
                 repeats: int = 5, threads: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Greedy decoding speed with the KV cache at batch 1 (new tokens per second, prefill included): torch eager
    (``GPT.step``), and ORT fp32 / int4 where given, measured side by side: every repeat runs each engine once,
    in a rotating order, and the median over repeats is reported (after one untimed warm-up run each).

    Args:
        model: the torch GPT (the reference engine).
        ids: prompt (T,).
        new_tokens: tokens generated per run.
        fp32, int4: OrtGPT sessions or ``.onnx`` paths (opened with `threads` threads).
        repeats: timed runs per engine.
        threads: intra-op threads for torch and the ORT sessions opened here.
        clock: ``time.perf_counter`` (wall) or ``time.process_time`` (CPU time of this process: steadier on a
            shared machine; equals wall time x threads when all threads are busy).

    Returns:
        ``{"torch_eager": tok/s, "ort_fp32": ..., "ort_int4": ...}`` (the engines given).

    Example:
        >>> decode_speed(t.model, t.tokenizer.encode("def "), 64, fp32="gpt.onnx", int4="gpt.int4.onnx")
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise WorkbenchError(f"repeats must be a positive integer, got {repeats!r}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise WorkbenchError(f"new_tokens must be a positive integer, got {new_tokens!r}")
    engines: dict[str, Callable[[], object]] = {
        "torch_eager": lambda: generate_tokens(model, ids, new_tokens, use_cache=True)}
    for name, m in (("ort_fp32", fp32), ("ort_int4", int4)):
        if m is not None:
            m = m if isinstance(m, OrtGPT) else OrtGPT(m, threads=threads)
            engines[name] = lambda m=m: generate_tokens_ort(m, ids, new_tokens)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    with torch_threads(threads):
        for fn in engines.values():
            fn()
        for r in range(repeats):
            for j in range(len(names)):
                name = names[(r + j) % len(names)]
                t0 = clock()
                engines[name]()
                seconds[name].append(clock() - t0)
    return {name: new_tokens / statistics.median(s) for name, s in seconds.items()}


def cpu_caches() -> dict[str, int]:
    """This CPU's data/unified cache sizes in bytes per instance (``{"L1d": ..., "L2": ..., "L3": ...}``), from
    /sys/devices/system/cpu/cpu0/cache, else ``lscpu -C``; {} where neither is available. (In a VM the
    hypervisor reports these, and an L3 is shared by all the host's cores.)

    Example:
        >>> cpu_caches()
        {'L1d': 49152, 'L2': 2097152, 'L3': 503316480}
    """
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

    def parse(s: str) -> int:
        s = s.strip()
        return int(float(s[:-1]) * units[s[-1].upper()]) if s and s[-1].upper() in units else int(s)

    out: dict[str, int] = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for d in sorted(root.glob("index*")):
            level, kind = (d / "level").read_text().strip(), (d / "type").read_text().strip()
            if kind == "Instruction":
                continue
            out[f"L{level}{'d' if kind == 'Data' else ''}"] = parse((d / "size").read_text())
    except (OSError, ValueError):
        out = {}
    if out:
        return out
    try:
        text = subprocess.run(["lscpu", "-C=NAME,ONE-SIZE"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) == 2 and parts[0] != "L1i":
                out[parts[0]] = parse(parts[1])
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    return out


def width_sweep(widths: tuple[int, ...] = (128, 256, 512, 1024), *, n_layer: int = 4, n_head: int = 4,
                block_size: int = 128, vocab_size: int = 103, prompt_len: int = 16, new_tokens: int = 64,
                repeats: int = 5, threads: int = 1, accuracy_level: int | None = None, seed: int = 0,
                clock: Callable[[], float] = time.perf_counter, workdir: str | os.PathLike | None = None) -> list[dict]:
    """Decoding speed as the model widens: random-weight GPTs (random weights decode as fast as trained ones),
    each exported to fp32 and int4 (RTN, block 32, symmetric, head float) and timed with :func:`decode_speed`.

    At batch 1 every token step reads every weight once, so the weight bytes per step against the cache sizes
    (:func:`cpu_caches`) show where decoding turns memory-bound, and where int4's 6x fewer bytes start to pay
    for its unpacking.

    Returns:
        One row per width: ``width``, ``params`` (Linear weights incl. the head), ``fp32_bytes_per_step``,
        ``int4_bytes_per_step`` (MatMulNBits bytes + the float head), ``kv_bytes`` (cache after the run),
        and tokens/s ``torch_eager``, ``ort_fp32``, ``ort_int4``.

    Example:
        >>> rows = width_sweep(); pd.DataFrame(rows)
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="wb-sweep-") if workdir is None else contextlib.nullcontext(workdir) as d:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        for width in widths:
            cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=width)
            model = GPT(cfg, seed=seed).eval()
            ids = torch.randint(0, vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(seed))
            f32, i4 = d / f"gpt-{width}.onnx", d / f"gpt-{width}.int4.onnx"
            export_gpt(model, f32)
            quantize_int4(f32, i4, accuracy_level=accuracy_level)
            size = int4_size(i4)
            params = sum(lin.weight.numel() for lin in _linears(model).values())
            speed = decode_speed(model, ids, new_tokens, fp32=f32, int4=i4, repeats=repeats, threads=threads,
                                 clock=clock)
            kv = 2 * n_layer * width * (prompt_len + new_tokens) * 4
            rows.append({"width": width, "params": params, "fp32_bytes_per_step": 4 * params,
                         "int4_bytes_per_step": size.int4_bytes + size.float_matmul_bytes, "kv_bytes": kv, **speed})
            for p in (f32, i4):
                p.unlink(missing_ok=True)
    return rows
