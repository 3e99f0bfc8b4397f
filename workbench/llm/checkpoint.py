"""GPT checkpoints: the architecture, the vocabulary and the weights, with quantized Linears stored packed.

A weight-only quantized layer is written as its packed codes, scales and zero points (not as float32),
so a 4-bit checkpoint is really about 8x smaller than the float one on disk; loading dequantizes them
back into the float layer. A W8A8 model keeps float weights and records each layer's activation
range, and is wrapped in :class:`workbench.quant.FakeQuantLayer` again on load.

Example:
    >>> save(path, qmodel, tokenizer, packed=packed, metadata={"val_bpc": 2.62})
    >>> model, tokenizer, meta = load(path)
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import WorkbenchError
from ..quant import FakeQuantLayer, QuantConfig
from .corpus import CharTokenizer
from .gpt import GPT, GPTConfig
from .weights import PackedWeight

__all__ = ["FORMAT", "save", "load", "is_gpt_checkpoint"]

FORMAT = "workbench-gpt-1"


def _packed_dict(p: PackedWeight) -> dict[str, Any]:
    return {"shape": list(p.shape), "bits": p.bits, "group_size": p.group_size, "symmetric": p.symmetric,
            "qmin": p.qmin, "codes": p.codes, "scale": p.scale, "zero_point": p.zero_point}


def save(path: str | os.PathLike, model: GPT, tokenizer: CharTokenizer, *,
         packed: dict[str, PackedWeight] | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` atomically; the Linears named in `packed` are stored as their packed weights.

    A model holding ``FakeQuantLayer`` wrappers (W8A8) is stored as its float layers plus the
    activation config and ranges.
    """
    packed = packed or {}
    act: dict[str, Any] = {}
    plain = model
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLayer)}
    if wrapped:
        import copy

        plain = copy.deepcopy(model)
        for name, m in wrapped.items():
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, m.layer)
            act[name] = {"range": [float(v) for v in m.act_range], "config": m.config.__dict__.copy()}
    state = {k: v.detach().cpu() for k, v in plain.state_dict().items()}
    if model.config.tie_weights:
        state.pop("lm_head.weight", None)  # the same tensor as wte.weight
    for name in packed:
        state.pop(f"{name}.weight")
    payload = {"format": FORMAT, "gpt": model.config.to_dict(), "chars": "".join(tokenizer.chars),
               "state_dict": state, "packed": {n: _packed_dict(p) for n, p in packed.items()},
               "activations": act, "metadata": metadata or {}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read(path: Path) -> Any:
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several types for foreign files
        return None


def is_gpt_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a file written by :func:`save` (anything else, or nothing, is False)."""
    payload = _read(Path(path))
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load(path: str | os.PathLike) -> tuple[GPT, CharTokenizer, dict[str, Any]]:
    """The model (eval mode), its tokenizer and the metadata of a checkpoint written by :func:`save`."""
    path = Path(path)
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WorkbenchError(f"{str(path)!r} is not a GPT checkpoint (expected a file written by "
                             "`workbench compress --model gpt` or workbench.llm.checkpoint.save)")
    try:
        model = GPT(GPTConfig(**payload["gpt"]))
        tokenizer = CharTokenizer(payload["chars"])
        state = dict(payload["state_dict"])
        for name, p in payload["packed"].items():
            pw = PackedWeight(shape=tuple(p["shape"]), bits=p["bits"], group_size=p["group_size"],
                              symmetric=p["symmetric"], qmin=p["qmin"], codes=p["codes"], scale=p["scale"],
                              zero_point=p["zero_point"])
            state[f"{name}.weight"] = pw.dequantize()
        if model.config.tie_weights:
            state["lm_head.weight"] = state["wte.weight"]
        model.load_state_dict(state)
        for name, a in payload["activations"].items():
            parent, _, child = name.rpartition(".")
            layer = model.get_submodule(name)
            setattr(model.get_submodule(parent), child,
                    FakeQuantLayer(layer, QuantConfig(**a["config"]), tuple(a["range"])).eval())
    except WorkbenchError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WorkbenchError(f"{str(path)!r} is a damaged GPT checkpoint ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); write it again") from None
    if tokenizer.vocab_size != model.config.vocab_size:
        raise WorkbenchError(f"{str(path)!r}: its vocabulary has {tokenizer.vocab_size} characters but the model "
                             f"{model.config.vocab_size}; write it again")
    return model.eval(), tokenizer, payload.get("metadata") or {}

