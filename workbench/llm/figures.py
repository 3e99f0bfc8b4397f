"""The measured figures of the large-model chapter: the cached default GPT's validation bits per character
and what each compression method costs it, with the corpus identity beside them.

Run (trains and caches the default model on a miss, ~3 min on 2 cores; then ~2 min of measuring):
    python -m workbench.llm.figures --json llm_figures.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch

from .awq import awq
from .calib import calibration_ids
from .gpt import generate
from .smooth import activation_stats, smoothquant, w8a8
from .sparsify import sparsify
from .trainer import TrainConfig, evaluate_bpc, pretrained
from .corpus import unigram_entropy
from .weights import WeightQuant, memory, quantize_weights

__all__ = ["measure"]


def measure(config: TrainConfig = TrainConfig(), *, n_calib: int = 32, seed: int = 0, max_val_chars: int | None = None,
            progress: bool | None = None) -> dict[str, Any]:
    """Every figure as a dict: bpc of fp and compressed models (deltas against fp), bits per weight, outliers.

    `max_val_chars` evaluates on a prefix of the validation text (for quick checks; the figures use all of it).
    """
    t0 = time.perf_counter()
    trained = pretrained(config, progress=progress)
    model, corpus = trained.model, trained.corpus
    val = corpus.ids("val")[:None if max_val_chars is None else max_val_chars + 1]
    calib = calibration_ids(corpus, n_seqs=n_calib, block_size=config.block_size, seed=seed)
    fp_eval = evaluate_bpc(model, val)
    fp = fp_eval.bits_per_char
    out: dict[str, Any] = {**corpus.identity(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "model_key": trained.meta.get("key"), "train_seconds": trained.meta.get("train_seconds"),
                           "train_cpu_seconds": trained.meta.get("train_cpu_seconds"),
                           "unigram_entropy_bpc": unigram_entropy(corpus.text), "val_bpc": fp,
                           "val_perplexity": fp_eval.perplexity, "val_chars": fp_eval.chars,
                           "calibration_rows": calib.numel()}
    out["bpc_over_unigram"] = fp / out["unigram_entropy_bpc"]
    stats = activation_stats(model, calib)
    out["outlier_ratio"] = {n: round(s.outlier_ratio, 2) for n, s in stats.items()}
    out["outlier_channels_6x"] = {n: s.outliers(6.0) for n, s in stats.items() if s.outliers(6.0)}

    delta: dict[str, float] = {}
    bpw: dict[str, float] = {}

    def record(label: str, m) -> None:
        delta[label] = evaluate_bpc(m, val).bits_per_char - fp

    for spec, methods in [(WeightQuant(8), ("rtn",)), (WeightQuant(4, 32), ("rtn", "gptq", "awq")),
                          (WeightQuant(4), ("rtn", "gptq")), (WeightQuant(3), ("rtn", "gptq")),
                          (WeightQuant(3, 32), ("rtn", "gptq", "awq")), (WeightQuant(2, 32), ("rtn", "gptq"))]:
        for method in methods:
            if method == "awq":
                scaled, _ = awq(model, calib, spec)
                q, packed = quantize_weights(scaled, spec)
            else:
                q, packed = quantize_weights(model, spec, method=method, calib=calib)
            record(f"{spec.label()} {method}", q)
            bpw[spec.label()] = memory(packed)["bits_per_weight"]
    record("w8a8 per-tensor", w8a8(model, calib))
    smoothed, alphas = smoothquant(model, calib)
    record("w8a8 per-tensor smoothquant", w8a8(smoothed, calib))
    out["smoothquant_alphas"] = alphas
    for nm in (None, (2, 4)):
        for method in ("magnitude", "wanda", "sparsegpt"):
            pruned = sparsify(model, method=method, amount=0.5, nm=nm, calib=calib)
            record(f"{'2:4' if nm else '50%'} {method}", pruned)
    out["delta_bpc"] = delta
    out["bits_per_weight"] = bpw
    out["memory_int4_g32"] = memory(quantize_weights(model, WeightQuant(4, 32))[1])
    out["sample_greedy"] = generate(model, corpus.tokenizer, "The ", max_new_tokens=120)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["python"] = platform.python_version()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    figures = measure()
    text = json.dumps(figures, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
