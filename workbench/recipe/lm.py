"""The pipeline for a language model: ``run(Recipe(model="gpt", dataset="pydoc", ...))`` gives an :class:`LMResult`.

The same recipe, the same table of steps and the same cache as the image classifiers; what differs is
what a step does to a GPT and what is measured. Training is :func:`workbench.llm.pretrained` (by
steps, AdamW, warmup + cosine; ``model_options`` are its :class:`~workbench.llm.TrainConfig`), and the
compression steps work without retraining, on a calibration set of 32 windows of the *train* text:

- ``prune``: magnitude (per layer), Wanda (per output row) or SparseGPT, at ``prune_amount`` or 2:4;
- ``quantize``: weight-only RTN, GPTQ or AWQ at ``weight_bits`` per channel or per ``group_size``
  group; or, with ``act_bits``, W8A8 per tensor, after SmoothQuant's scales with ``quant_method="smoothquant"``.

The metric is validation bits per character on the same held-out text for every model. Only the
Linears of the transformer blocks are compressed (the tied embedding and head stay float, as in the
GPTQ and AWQ papers); sizes and bits per weight count those Linears. ONNX export of the GPT is not
part of this pipeline (a Result's export and latency settings are not used here).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import llm
from ..errors import WorkbenchError
from ..store import cache_dir, publish_dir
from . import cache as _cache
from . import steps as _steps
from .result import _versions
from .settings import Recipe

__all__ = ["LMResult", "LMPruneRecord", "LMQuantRecord", "run_lm", "PROMPT", "CALIBRATION_SEQUENCES",
           "LM_RESULT_VERSION"]

# Bump when LMResult's fields or what a measurement means change: old cache entries then miss.
LM_RESULT_VERSION = 1
CALIBRATION_SEQUENCES = 32
# The prompt every model of the book continues (greedy and sampled with one seed), so texts compare.
PROMPT = "The return statement "
SAMPLE_CHARS = 160
SAMPLE_TEMPERATURE = 0.8


@dataclass(frozen=True)
class LMPruneRecord(_steps._Record):
    """method and kind as asked; scope: how weights compete (per layer, per output row, OBS per row);
    sparsity: the measured fraction of zero weights in the block Linears."""

    method: str
    kind: str
    amount: float
    scope: str
    sparsity: float


@dataclass(frozen=True)
class LMQuantRecord(_steps._Record):
    """What the quantize step stored: bytes of codes, scales and zero points of the block Linears
    (``weight_bytes`` their sum) and, for AWQ/SmoothQuant, the alpha chosen per layer."""

    method: str
    weight_bits: int
    act_bits: int
    group_size: int
    symmetric: bool
    code_bytes: int
    scale_bytes: int
    zero_point_bytes: int
    alphas: dict[str, float] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes + self.zero_point_bytes


_RECORDS = {"prune": LMPruneRecord, "quantize": LMQuantRecord}


@dataclass(frozen=True)
class LMResult:
    """What `run` measured for a language-model recipe.

    ``val_bpc`` is the validation cross-entropy in bits per character over ``val_chars`` held-out
    characters (every model is measured on the same text); ``dense_val_bpc`` the uncompressed model's
    (None for it). ``weight_bytes`` and ``bits_per_weight`` count the block Linears as stored (packed
    codes + float32 scales + zero points when quantized, float32 otherwise). ``samples`` holds the
    greedy and the sampled continuation of :data:`PROMPT`.
    """

    recipe: Recipe
    key: str
    val_bpc: float
    val_perplexity: float
    val_chars: int
    dense_val_bpc: float | None
    unigram_bpc: float
    params: int
    linear_weights: int
    weight_bytes: int
    fp32_weight_bytes: int
    sparsity: float
    steps: dict[str, Any]
    corpus: dict[str, Any]
    samples: dict[str, str]
    train_seconds: float
    checkpoint_path: str
    versions: dict[str, str]
    created: str
    cached: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / self.linear_weights

    @property
    def delta_bpc(self) -> float:
        """Bits per character lost to compression (0 for the dense model)."""
        return 0.0 if self.dense_val_bpc is None else self.val_bpc - self.dense_val_bpc

    def load_model(self) -> tuple[llm.GPT, llm.CharTokenizer]:
        """The measured model (compressed weights as stored) and its tokenizer."""
        model, tok, _ = llm.checkpoint.load(self.checkpoint_path)
        return model, tok

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cached"}
        d["recipe"] = self.recipe.to_dict()
        d["steps"] = {name: rec.to_dict() for name, rec in self.steps.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, cached: bool = False) -> "LMResult":
        d = dict(d)
        recipe = d["recipe"] if isinstance(d["recipe"], Recipe) else Recipe.from_dict(d["recipe"])
        steps = {name: _RECORDS[name].from_dict(rec) for name, rec in d.pop("steps").items()}
        return cls(**{**d, "recipe": recipe, "steps": steps, "cached": cached})


def _key(recipe: Recipe, corpus: llm.Corpus) -> str:
    return _cache.key(recipe, f"lm:{recipe.model}:v{LM_RESULT_VERSION}", corpus.sha256)


def _read(entry: Path, recipe: Recipe) -> LMResult | None:
    try:
        hit = LMResult.from_dict({**json.loads((entry / "result.json").read_text()), "recipe": recipe}, cached=True)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # damaged: measured again and replaced
    return dataclasses.replace(hit, checkpoint_path=str(entry / "model.pt"))


def _prune(r: Recipe, model: llm.GPT, calib: torch.Tensor) -> tuple[llm.GPT, LMPruneRecord]:
    nm = (2, 4) if r.prune_kind == "2:4" else None
    pruned = llm.sparsify(model, method=r.prune_method, amount=r.prune_amount, nm=nm, calib=calib)
    scope = {"magnitude": "per layer", "wanda": "per output row", "sparsegpt": "per output row, OBS update"}
    if nm:
        scope = {m: "2 of every 4 inputs" for m in scope}
    linears = llm.block_linears(pruned).values()
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    return pruned, LMPruneRecord(method=r.prune_method, kind=r.prune_kind, amount=r.prune_amount,
                                 scope=scope[r.prune_method], sparsity=zeros / total)


def _quantize(r: Recipe, model: llm.GPT, calib: torch.Tensor
              ) -> tuple[llm.GPT, dict[str, llm.PackedWeight], LMQuantRecord]:
    alphas: dict[str, float] = {}
    common = dict(method=r.quant_method, weight_bits=r.weight_bits, act_bits=r.act_bits, group_size=r.group_size,
                  symmetric=r.quant_symmetric)
    if r.act_bits:
        if r.quant_method == "smoothquant":
            model, alphas = llm.smoothquant(model, calib, bits=r.act_bits)
        q = llm.w8a8(model, calib, weight_bits=r.weight_bits, act_bits=r.act_bits)
        # Per-tensor weights: the codes and one float32 scale per Linear.
        linears = llm.block_linears(model).values()
        codes = sum(-(-m.weight.numel() * (r.weight_bits or 32) // 8) for m in linears)
        return q, {}, LMQuantRecord(**common, code_bytes=codes, scale_bytes=4 * len(linears) if r.weight_bits else 0,
                                    zero_point_bytes=0, alphas=alphas)
    spec = llm.WeightQuant(r.weight_bits, r.group_size or None, r.quant_symmetric)
    if r.quant_method == "awq":
        model, alphas = llm.awq(model, calib, spec)
    q, packed = llm.quantize_weights(model, spec, method="gptq" if r.quant_method == "gptq" else "rtn", calib=calib)
    mem = llm.memory(packed)
    return q, packed, LMQuantRecord(**common, code_bytes=int(mem["code_bytes"]), scale_bytes=int(mem["scale_bytes"]),
                                    zero_point_bytes=int(mem["zero_point_bytes"]), alphas=alphas)


def run_lm(recipe: Recipe, *, cache: str | os.PathLike | None = None, use_cache: bool = True,
           progress: bool | None = None) -> LMResult:
    """Run a language-model recipe (see the module's doc); cached like every run.

    Example:
        >>> res = run(Recipe(model="gpt", dataset="pydoc", weight_bits=4, group_size=32, quant_method="gptq"))
        >>> res.val_bpc, res.delta_bpc, res.bits_per_weight
    """
    if not _steps.is_language_model(recipe):
        raise WorkbenchError(f"run_lm runs the GPT; model {recipe.model!r} is an image classifier (use run)")
    corpus = llm.load_corpus()
    config = _steps.lm_train_config(recipe)
    root = cache_dir(cache) / "lm-results"
    key = _key(recipe, corpus)
    if use_cache and (hit := _read(root / key, recipe)) is not None:
        return hit
    trained = llm.pretrained(config, corpus=corpus, cache=cache, progress=progress)
    model, tok = trained.model, trained.tokenizer
    val = corpus.ids("val")
    dense_bpc = None
    records: dict[str, Any] = {}
    packed: dict[str, llm.PackedWeight] = {}
    if recipe.compressed:
        dense_bpc = run_lm(recipe.dense(), cache=cache, use_cache=use_cache, progress=progress).val_bpc
        calib = llm.calibration_ids(corpus, n_seqs=CALIBRATION_SEQUENCES, block_size=config.block_size,
                                    seed=recipe.seed)
        for step in _steps.STEPS:
            if step.kind != "compress" or step.apply is None or not step.active(recipe):
                continue
            if step.name == "prune":
                model, records["prune"] = _prune(recipe, model, calib)
            elif step.name == "quantize":
                model, packed, records["quantize"] = _quantize(recipe, model, calib)
            else:  # the recipe's validation refuses these for the GPT; a new step must say what it does here
                raise WorkbenchError(f"the {step.name!r} step has no language-model version")
    bpc = llm.evaluate_bpc(model, val)
    n_weights = sum(m.weight.numel() for m in llm.block_linears(trained.model).values())  # same shapes compressed
    quant_rec = records.get("quantize")
    weight_bytes = quant_rec.weight_bytes if quant_rec is not None else 4 * n_weights
    sparsity = records["prune"].sparsity if "prune" in records else 0.0
    samples = {"prompt": PROMPT,
               "greedy": llm.generate(model, tok, PROMPT, max_new_tokens=SAMPLE_CHARS),
               "sampled": llm.generate(model, tok, PROMPT, max_new_tokens=SAMPLE_CHARS,
                                       temperature=SAMPLE_TEMPERATURE, seed=recipe.seed)}
    train_seconds = float(trained.meta.get("train_seconds", 0.0))

    def fill(entry: Path) -> LMResult:
        result = LMResult(
            recipe=recipe, key=key, val_bpc=bpc.bits_per_char, val_perplexity=bpc.perplexity, val_chars=bpc.chars,
            dense_val_bpc=dense_bpc, unigram_bpc=llm.unigram_entropy(corpus.text),
            params=sum(p.numel() for p in trained.model.parameters()), linear_weights=n_weights,
            weight_bytes=weight_bytes, fp32_weight_bytes=4 * n_weights, sparsity=sparsity, steps=records,
            corpus=corpus.identity(), samples=samples, train_seconds=train_seconds,
            checkpoint_path="model.pt", versions={**_versions(), "lm_result": str(LM_RESULT_VERSION)},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        llm.checkpoint.save(entry / "model.pt", model, tok, packed=packed,
                            metadata={"recipe": recipe.to_dict(), "val_bpc": bpc.bits_per_char,
                                      "dense_val_bpc": dense_bpc, **corpus.identity()})
        (entry / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
        return result

    result = publish_dir(root, key, fill, is_complete=lambda e: _read(e, recipe) is not None)
    return dataclasses.replace(result, checkpoint_path=str(root / key / "model.pt"))
