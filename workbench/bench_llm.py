"""The bench group ``llm-serve`` (chapter 13): generating with the GPT — the KV cache, speculative decoding,
ONNX Runtime fp32 and int4, and streaming generation from the server with batching across clients.

Speeds are measured side by side in one run (medians of interleaved repeats) and reported; the bars hold
only ratios and exact properties (`workbench.bars.BARS`).

Run: ``workbench bench --only llm-serve --json llm-serve.json`` (about 1.5 minutes on 2 cores; the GPT
and its draft are trained by the llm group, or here on a miss).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import llm
from .measure import torch_threads
from .presets import LLM_BASE, LLM_DRAFT, LLM_PROMPTS
from .recipe.steps import lm_train_config

__all__ = ["llm_serve_figures", "KV_CONFIG"]

# The KV cache's speed is a property of the shapes, not of the weights: a random GPT as wide as the
# book's but with a context of 512, so that 256 new tokens fit without cropping.
KV_CONFIG = dict(vocab_size=103, block_size=512, n_layer=4, n_head=4, n_embd=128)
KV_NEW_TOKENS = 256
SPEC_KS = (2, 4, 8)
SPEC_NEW_TOKENS = 96
ORT_STEPS = 64
WIDTHS = (128, 256, 512, 1024)


def _kv_cache(rows: list[dict], figures: dict[str, Any]) -> None:
    model = llm.GPT(llm.GPTConfig(**KV_CONFIG), seed=0).eval()
    prompt = torch.randint(0, KV_CONFIG["vocab_size"], (16,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        speeds = {c: [] for c in (True, False)}
        for _ in range(3):  # interleaved: each repeat times both, so a busy moment hits both alike
            for use_cache in (True, False):
                speeds[use_cache].append(llm.tokens_per_second(model, prompt, KV_NEW_TOKENS, use_cache=use_cache,
                                                               repeats=1))
        with_cache, without = sorted(speeds[True])[1], sorted(speeds[False])[1]
        _, cache = llm.generate_tokens(model, prompt, KV_NEW_TOKENS, use_cache=True, return_cache=True)
    expected = llm.kv_cache_bytes(model.config, cache.length)
    figures.update({"llm_kv_cache_speedup_256": with_cache / without, "llm_kv_cache_tokens_per_s": with_cache,
                    "llm_no_cache_tokens_per_s": without, "llm_kv_cache_bytes": cache.nbytes,
                    "llm_kv_cache_bytes_error": abs(cache.nbytes - expected)})
    rows.append({"name": "kv_cache", "new_tokens": KV_NEW_TOKENS, "with_cache_tokens_per_s": with_cache,
                 "without_cache_tokens_per_s": without, "cache_bytes": cache.nbytes, "config": KV_CONFIG})


def _speculative(target: llm.GPT, tok: llm.CharTokenizer, draft: llm.GPT, rows: list[dict],
                 figures: dict[str, Any]) -> None:
    ids = tok.encode(LLM_PROMPTS[0])
    plain = llm.generate_tokens(target, ids, SPEC_NEW_TOKENS, use_cache=True)
    exact = True
    for k in SPEC_KS:
        times: dict[str, list[float]] = {"target": [], "speculative": []}
        for _ in range(3):
            t0 = time.perf_counter()
            llm.generate_tokens(target, ids, SPEC_NEW_TOKENS, use_cache=True)
            times["target"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            res = llm.speculative_generate(target, draft, ids, SPEC_NEW_TOKENS, k=k)
            times["speculative"].append(time.perf_counter() - t0)
        exact = exact and torch.equal(res.tokens, plain)
        speedup = sorted(times["target"])[1] / sorted(times["speculative"])[1]
        figures[f"llm_speculative_acceptance_k{k}"] = res.acceptance_rate
        figures[f"llm_speculative_tokens_per_call_k{k}"] = res.tokens_per_target_call
        figures[f"llm_speculative_speedup_k{k}"] = speedup
        rows.append({"name": f"speculative_k{k}", "acceptance_rate": res.acceptance_rate, "alpha": res.alpha,
                     "tokens_per_target_call": res.tokens_per_target_call,
                     "formula_tokens_per_call": llm.expected_tokens_per_call(res.alpha, k), "speedup": speedup})
    figures["llm_speculative_greedy_exact"] = int(exact)


def _ort(target: llm.GPT, tok: llm.CharTokenizer, corpus: llm.Corpus, rows: list[dict],
         figures: dict[str, Any]) -> None:
    ids = tok.encode(LLM_PROMPTS[0])
    with tempfile.TemporaryDirectory(prefix="wb-llm-ort-") as d:
        fp32 = llm.export_gpt(target, Path(d) / "gpt.onnx")
        int4 = llm.quantize_int4(fp32, Path(d) / "gpt.int4.onnx")
        sess = llm.OrtGPT(fp32)
        err, past, cache = 0.0, None, None
        step = ids.unsqueeze(0)
        with torch.no_grad():
            for _ in range(ORT_STEPS):  # greedy, the same tokens fed to both
                ref, cache = target.step(step, cache)
                got, past = sess.step(step, past)
                err = max(err, float((ref[:, -1] - got[:, -1]).abs().max()))
                step = ref[:, -1].argmax(-1, keepdim=True)
        size = llm.onnx_gpt.int4_size(int4)
        speed = llm.onnx_gpt.decode_speed(target, ids, 64, fp32=fp32, int4=int4)
        val = corpus.ids("val")
        bpc_int4 = llm.evaluate_bpc_ort(llm.OrtGPT(int4), val).bits_per_char
    ours = llm.evaluate_bpc(llm.quantize_weights(target, llm.WeightQuant(4, 32))[0], val).bits_per_char
    figures.update({"llm_ort_parity_max_abs_err": err, "llm_ort_int4_size_ratio": size.ratio,
                    "llm_ort_int4_bpc": bpc_int4, "llm_workbench_int4_bpc": ours,
                    "llm_ort_tokens_per_s_torch": speed["torch_eager"], "llm_ort_tokens_per_s_fp32": speed["ort_fp32"],
                    "llm_ort_tokens_per_s_int4": speed["ort_int4"]})
    rows.append({"name": "ort_trained", **speed, **size.to_dict(), "int4_bpc": bpc_int4, "workbench_int4_bpc": ours})
    sweep = llm.onnx_gpt.width_sweep(WIDTHS)
    for row in sweep:
        figures[f"llm_ort_int4_over_fp32_tokens_per_s_w{row['width']}"] = row["ort_int4"] / row["ort_fp32"]
    figures["llm_ort_int4_over_fp32_tokens_per_s"] = sweep[-1]["ort_int4"] / sweep[-1]["ort_fp32"]
    rows += [{"name": f"width_{row['width']}", **row} for row in sweep]
    rows.append({"name": "cpu_caches", **llm.onnx_gpt.cpu_caches()})


def _serving(target: llm.GPT, tok: llm.CharTokenizer, rows: list[dict], figures: dict[str, Any]) -> None:
    from .serve.generate import generation_bench

    out = generation_bench(target, tok, prompts=LLM_PROMPTS, clients=(1, 4, 16), new_tokens=64)
    figures.update({f"llm_serve_{k}": v for k, v in out["figures"].items()})
    for r in out["rows"]:
        figures[f"llm_serve_{r['mode']}_ttft_p99_s_c{r['clients']}"] = r["ttft_p99_s"]
    rows += [{"name": f"serve_{r['mode']}_c{r['clients']}", **{k: v for k, v in r.items() if k != "texts"}}
             for r in out["rows"]]


def llm_serve_figures(*, cache: str | os.PathLike | None = None,
                      progress: bool | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Every figure of the group (see the module's doc): rows of measurements and the named figures."""
    trained = llm.pretrained(lm_train_config(LLM_BASE), cache=cache, progress=progress)
    draft = llm.pretrained(LLM_DRAFT, cache=cache, progress=progress)
    target, tok = trained.model, trained.tokenizer
    rows: list[dict] = []
    figures: dict[str, Any] = {"llm_draft_val_bpc": draft.meta["val_bpc"], "llm_target_val_bpc": trained.meta["val_bpc"]}
    with torch_threads(1):  # batch-1 decoding: one thread, as the ORT sessions
        _kv_cache(rows, figures)
        _speculative(target, tok, draft.model, rows, figures)
        _ort(target, tok, trained.corpus, rows, figures)
    _serving(target, tok, rows, figures)
    return rows, figures
