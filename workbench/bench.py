"""Benchmarks: named groups of measured figures, written as JSON by `workbench bench --json PATH`.

Each group returns result rows and a flat map of named figures; later chapters add groups
(pruning, quant, distributed, ...). The book's performance numbers come from the same code.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import onnxruntime
import torch

from . import bars
from .errors import WorkbenchError
from .ort import cpu_flags
from .data import load
from .quant import packed_bytes as quant_packed_bytes
from .presets import (BASELINES, DEEP_COMPRESSION, KD_SEEDS, LLM_BASE, LLM_BITS, LLM_DRAFT, LLM_GROUPS,
                      LLM_PRUNE_KINDS, LLM_PRUNE_METHODS, LLM_QUANT_METHODS, LLM_W8A8, MARGIN_SEEDS, PRUNE_STRUCTURED,
                      PRUNE_UNSTRUCTURED, QUANT_BASE, QUANT_RUNS, distillation_runs, llm_prune, llm_quant)
from .recipe import Result, run, sweep
from .recipe.steps import lm_train_config

__all__ = ["GROUPS", "machine_info", "run_bench", "seed_margins", "write_json", "failed_bars"]

def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model, "logical_cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
        "numeric_config": bars.numeric_config(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _row(name: str, r: Result) -> dict[str, Any]:
    return {
        "name": name, **r.summary(), "val_accuracy": r.val_accuracy,
        "onnx_max_abs_err": r.onnx_max_abs_err, "onnx_top1_agreement": r.onnx_top1_agreement,
        "torch_b1_p50_us": r.latency_torch_b1.p50_us, "ort_b1_p50_us": r.latency_ort_b1.p50_us,
        "ort_vs_torch_speedup_b1": r.latency_torch_b1.p50_us / r.latency_ort_b1.p50_us,
        "threads": r.latency_torch_b1.threads, "train_seconds": r.train_seconds, "cached": r.cached,
        "recipe": r.recipe.to_dict(),
    }


def baseline(*, cache: str | os.PathLike | None, progress: bool | None) -> tuple[list[dict], dict[str, float]]:
    """Train (or fetch) the five baselines; accuracy, ONNX parity and ORT-vs-torch latency."""
    results = dict(zip(BASELINES, sweep(BASELINES.values(), cache=cache, progress=progress)))
    rows = [_row(name, r) for name, r in results.items()]
    figures: dict[str, Any] = {f"baseline_acc_{name}": bars.accuracy(r) for name, r in results.items()}
    figures["onnx_parity_max_abs_err"] = max(r.onnx_max_abs_err for r in results.values())
    figures["onnx_top1_agreement"] = min(r.onnx_top1_agreement for r in results.values())
    # Each ratio is torch p50 / ORT p50 for the same model measured side by side in one run();
    # the figure is the median over the five models.
    figures["ort_vs_torch_speedup_b1"] = statistics.median(row["ort_vs_torch_speedup_b1"] for row in rows)
    return rows, figures


def seed_margins(*, cache: str | os.PathLike | None, progress: bool | None,
                 seeds: tuple[int, ...] = MARGIN_SEEDS) -> tuple[list[dict], dict[str, Any]]:
    """Each baseline's test count over `seeds`: min / mean / max, and its margin to the bar in images.

    The figure ``baseline_acc_<name>_seed_min`` (the lowest seed, exact) is held to the same bar as
    ``baseline_acc_<name>``; the runs skip the ONNX export and time one call (only accuracy counts).
    """
    rows, figures = [], {}
    for name, recipe in BASELINES.items():
        runs = [run(recipe.replace(seed=s, export_onnx=False, latency_repeats=1), cache=cache, progress=progress)
                for s in seeds]
        counts = [r.test_correct for r in runs]
        n = runs[0].test_n
        figure = f"baseline_acc_{name}"
        rows += [{"name": name, "seed": s, "correct": r.test_correct, "n": r.test_n,
                  "val_correct": round(r.val_accuracy * len(load(recipe.dataset, seed=s).y_val)),
                  "margin_images": bars.margin_images(figure, r.test_correct, r.test_n)}
                 for s, r in zip(seeds, runs)]
        figures[f"{figure}_seed_min"] = Fraction(min(counts), n)
        figures[f"margin_{name}_min_correct"] = min(counts)
        figures[f"margin_{name}_mean_correct"] = statistics.fmean(counts)
        figures[f"margin_{name}_max_correct"] = max(counts)
        figures[f"margin_{name}_needed"] = bars.BARS[figure].count_needed(n)
        figures[f"margin_{name}_min_images"] = bars.margin_images(figure, min(counts), n)
    return rows, figures


_drop_pp = bars.drop_pp  # exact, from the test counts of the two runs


def pruning(*, cache: str | os.PathLike | None, progress: bool | None) -> tuple[list[dict], dict[str, float]]:
    """Accuracy after global magnitude pruning, one-shot vs gradual, and structured pruning's MACs vs latency."""
    from . import onnx as wonnx
    from .measure import side_by_side

    dense = run(PRUNE_UNSTRUCTURED, cache=cache, progress=progress)
    runs = {f"unstructured_{int(a * 100)}": PRUNE_UNSTRUCTURED.replace(prune_amount=a, finetune_epochs=5)
            for a in (0.8, 0.9)}
    # Same total fine-tuning (4 epochs) for both, so only the schedule differs.
    runs["oneshot_95"] = PRUNE_UNSTRUCTURED.replace(prune_amount=0.95, finetune_epochs=4)
    runs["gradual_95"] = PRUNE_UNSTRUCTURED.replace(prune_amount=0.95, prune_schedule="gradual", prune_steps=4,
                                                    finetune_epochs=1)
    results = {name: run(r, cache=cache, progress=progress) for name, r in runs.items()}
    figures = {f"prune_{name}_acc_drop_pp": _drop_pp(dense, r) for name, r in results.items()}

    cnn = run(PRUNE_STRUCTURED, cache=cache, progress=progress)
    small = run(PRUNE_STRUCTURED.replace(prune_amount=0.5, prune_kind="structured", finetune_epochs=5),
                cache=cache, progress=progress)
    x = load(PRUNE_STRUCTURED.dataset, seed=PRUNE_STRUCTURED.seed).X_test[:64].numpy()
    sessions = {"dense": wonnx.session(cnn.onnx_path), "pruned": wonnx.session(small.onnx_path)}
    stats = side_by_side({k: (lambda s=s: s.run(None, {"input": x})) for k, s in sessions.items()},
                         batch_size=len(x))
    figures["prune_channels_50_macs_reduction"] = cnn.macs / small.macs
    figures["prune_channels_50_params_reduction"] = cnn.params / small.params
    figures["prune_channels_50_latency_speedup"] = stats["dense"].p50_us / stats["pruned"].p50_us
    # The bar: latency follows at least 60% of the MACs reduction.
    figures["prune_channels_50_speedup_per_macs"] = (figures["prune_channels_50_latency_speedup"]
                                                     / figures["prune_channels_50_macs_reduction"])
    figures["prune_channels_50_acc_drop_pp"] = _drop_pp(cnn, small)

    # The explorer's promise: a point computed before answers in <= 0.3 s (cache hit + redraw).
    from .widgets import PruningExplorer

    explorer = PruningExplorer(PRUNE_UNSTRUCTURED, cache=cache)
    explorer.finetune.value = 5
    explorer.ratio.value = 0.8
    explorer.ratio.value = 0.9
    figures["prune_explorer_cached_response_s"] = explorer.last_seconds

    rows = [{"name": "lenet300_dense", **dense.summary()}]
    rows += [{"name": f"lenet300_{name}", **r.summary(), "sparse_bytes": r.sparse_bytes,
              "acc_drop_pp": _drop_pp(dense, r)} for name, r in results.items()]
    rows += [{"name": name, **r.summary(), "ort_b64_p50_us": stats[key].p50_us}
             for name, r, key in (("cnn_dense", cnn, "dense"), ("cnn_channels_50", small, "pruned"))]
    return rows, figures


def _deep_compression(*, cache: str | os.PathLike | None,
                      progress: bool | None) -> tuple[list[dict], dict[str, float]]:
    """Deep Compression's real encoded size against the float32 model, and its accuracy cost.

    The ratio divides what Han et al. call the original size, 4 bytes x every parameter of the
    dense model (weights and biases), by ``Result.size_encoded_bytes`` = ``coding.Encoded.nbytes()``:
    the Huffman-coded index and position bit streams, the float32 codebooks, the code tables, a
    4-byte entry count per layer and the float32 biases.
    """
    rows, figures = [], {}
    for name, recipe in DEEP_COMPRESSION.items():
        dense = run(recipe.dense(), cache=cache, progress=progress)
        small = run(recipe, cache=cache, progress=progress)
        dense_bytes = 4 * dense.params
        suffix = "" if name == "lenet300" else f"_{name}"
        figures[f"deep_compression_ratio{suffix}"] = dense_bytes / small.size_encoded_bytes
        figures[f"deep_compression_acc_drop_pp{suffix}"] = _drop_pp(dense, small)
        if name == "lenet300":
            figures["deep_compression_kb"] = small.size_encoded_bytes / 1000  # KB of 1000 bytes, as the paper
        rows.append({"name": f"{name}_deep_compression", **small.summary(), "dense_bytes": dense_bytes,
                     "encoded_bytes": small.size_encoded_bytes, "ratio": dense_bytes / small.size_encoded_bytes,
                     "acc_drop_pp": _drop_pp(dense, small), "layers": small.steps["share"].layers})
    return rows, figures


def _distillation(*, cache: str | os.PathLike | None,
                  progress: bool | None) -> tuple[list[dict], dict[str, float]]:
    """Distilled student minus the same student trained alone, and the share of the teacher gap closed.

    ``kd_gap_closed`` = (distilled - alone) / (teacher - alone), each a mean over KD_SEEDS.
    """
    per_seed = {seed: distillation_runs(seed, cache=cache, progress=progress) for seed in KD_SEEDS}
    # Exact means of exact accuracies, so that "gain > 0" is decided by counts, not rounding.
    mean = {k: sum(bars.accuracy(runs[k]) for runs in per_seed.values()) / len(per_seed)
            for k in ("teacher", "alone", "distilled")}
    gap = mean["teacher"] - mean["alone"]
    figures = {
        "kd_teacher_acc": mean["teacher"], "kd_student_alone_acc": mean["alone"],
        "kd_student_distilled_acc": mean["distilled"],
        "kd_gain_pp": 100 * (mean["distilled"] - mean["alone"]),
        "kd_gap_closed": (mean["distilled"] - mean["alone"]) / gap if gap > 0 else float("nan"),
        "kd_param_ratio": per_seed[KD_SEEDS[0]]["alone"].params / per_seed[KD_SEEDS[0]]["teacher"].params,
    }
    rows = [{"name": f"kd_{kind}_seed{seed}", **r.summary()}
            for seed, runs in per_seed.items() for kind, r in runs.items()]
    return rows, figures


def quant(*, cache: str | os.PathLike | None, progress: bool | None) -> tuple[list[dict], dict[str, float]]:
    """Chapters 4-6: PTQ at 8/4 bits (per-channel, per-tensor), QAT at 4/2 bits, distillation, Deep Compression."""
    fp32 = run(QUANT_BASE, cache=cache, progress=progress)
    results = {name: run(QUANT_BASE.replace(**kw), cache=cache, progress=progress) for name, kw in QUANT_RUNS.items()}
    figures = {f"{name}_acc_drop_pp": _drop_pp(fp32, r) for name, r in results.items()}
    # Tensor bytes against tensor bytes (chapter 4's table): the fp32 model's tensors at 32 bits,
    # the quantized model's packed codes, scales, zero points and float biases.
    fp32_bytes = quant_packed_bytes(fp32.load_model())
    figures["ptq_int8_size_ratio"] = fp32_bytes / results["ptq_int8"].size_quantized_bytes
    figures["ptq_int4_size_ratio"] = fp32_bytes / results["ptq_int4"].size_quantized_bytes
    rows = [{"name": "cnn_fp32", **fp32.summary()}]
    rows += [{"name": f"cnn_{name}", **r.summary(), "packed_bytes": r.size_quantized_bytes,
              "acc_drop_pp": _drop_pp(fp32, r), "layer_sqnr_db": r.layer_sqnr} for name, r in results.items()]
    for part in (_distillation, _deep_compression):
        more_rows, more_figures = part(cache=cache, progress=progress)
        rows += more_rows
        figures.update(more_figures)
    return rows, figures


def distributed(*, cache: str | os.PathLike | None, progress: bool | None) -> tuple[list[dict], dict[str, float]]:
    """Chapter 9: DDP and pipeline equivalence, bubble, ring all-reduce bytes, PowerSGD (torchrun jobs)."""
    from .distributed.bench import distributed_figures

    return distributed_figures(cache=cache, progress=progress)


def deploy(*, cache: str | os.PathLike | None, progress: bool | None) -> tuple[list[dict], dict[str, float]]:
    """Chapters 7-8: torch eager vs ORT fp32 vs ORT int8 dynamic / static QDQ (MLP and CNN), BN folding."""
    from .bench_deploy import deploy_figures

    out = deploy_figures(cache=cache, progress=progress)
    return out["rows"], out["figures"]


def llm_serve(*, cache: str | os.PathLike | None, progress: bool | None) -> tuple[list[dict], dict[str, Any]]:
    """Chapter 13: the KV cache, speculative decoding, the GPT in ONNX Runtime (fp32, int4) and /generate."""
    from .bench_llm import llm_serve_figures

    return llm_serve_figures(cache=cache, progress=progress)


def serving(*, cache: str | os.PathLike | None, progress: bool | None) -> tuple[list[dict], dict[str, float]]:
    """Chapter 10: batched vs unbatched throughput, p99 at a fixed rate, failed requests across a hot swap."""
    from .serve.bench import serving as _serving

    return _serving(cache=cache, progress=progress)


def _llm_label(r) -> str:
    """The name of a language-model run in the bench's figures, e.g. "int4_g32_gptq", "50_wanda", "2of4_sparsegpt"."""
    rec = r.recipe
    if "prune" in r.steps:
        return f"{'2of4' if rec.prune_kind == '2:4' else f'{round(100 * rec.prune_amount)}'}_{rec.prune_method}"
    if rec.act_bits:
        return f"w{rec.weight_bits}a{rec.act_bits}" + ("_smoothquant" if rec.quant_method == "smoothquant" else "")
    return f"int{rec.weight_bits}_{f'g{rec.group_size}' if rec.group_size else 'pc'}_{rec.quant_method}"


def llm(*, cache: str | os.PathLike | None, progress: bool | None) -> tuple[list[dict], dict[str, Any]]:
    """Chapter 12: the GPT's bits per character, fp32 and compressed every way of the chapter (one grid with
    its explorer), with bits per weight from the packed bytes; Wanda against magnitude with outlier channels."""
    from . import llm as _llm

    base = run(LLM_BASE, cache=cache, progress=progress)
    runs = [llm_quant(b, g, m) for b in LLM_BITS for g in LLM_GROUPS for m in LLM_QUANT_METHODS]
    runs += [llm_prune(m, k) for k in LLM_PRUNE_KINDS for m in LLM_PRUNE_METHODS] + list(LLM_W8A8.values())
    results = sweep(runs, cache=cache, progress=progress)
    figures: dict[str, Any] = {"llm_val_bpc": base.val_bpc, "llm_unigram_bpc": base.unigram_bpc,
                               "llm_val_bpc_over_unigram": base.val_bpc / base.unigram_bpc,
                               "llm_val_perplexity": base.val_perplexity, "llm_train_seconds": base.train_seconds}
    rows = [{"name": "gpt_fp32", "val_bpc": base.val_bpc, "bits_per_weight": base.bits_per_weight,
             "cached": base.cached, "corpus": base.corpus, "recipe": base.recipe.to_dict()}]
    for r in results:
        label = _llm_label(r)
        figures[f"llm_{label}_delta_bpc"] = r.delta_bpc
        if "quantize" in r.steps and not r.recipe.act_bits:
            figures[f"llm_bits_per_weight_{label.rsplit('_', 1)[0]}"] = r.bits_per_weight
        rows.append({"name": f"gpt_{label}", "val_bpc": r.val_bpc, "delta_bpc": r.delta_bpc,
                     "bits_per_weight": r.bits_per_weight, "weight_bytes": r.weight_bytes, "sparsity": r.sparsity,
                     "cached": r.cached, "recipe": r.recipe.to_dict()})
    # The named figures, and the comparisons as ratios (a bar is a bound on one figure).
    figures["llm_int8_rtn_delta_bpc"] = figures["llm_int8_pc_rtn_delta_bpc"]
    figures["llm_int4_g32_gptq_over_rtn"] = figures["llm_int4_g32_gptq_delta_bpc"] / figures["llm_int4_g32_rtn_delta_bpc"]
    figures["llm_int3_gptq_over_rtn"] = figures["llm_int3_pc_gptq_delta_bpc"] / figures["llm_int3_pc_rtn_delta_bpc"]
    figures["llm_int2_g32_gptq_over_rtn"] = figures["llm_int2_g32_gptq_delta_bpc"] / figures["llm_int2_g32_rtn_delta_bpc"]
    figures["llm_wanda_over_magnitude_50"] = figures["llm_50_wanda_delta_bpc"] / figures["llm_50_magnitude_delta_bpc"]
    pruned_2of4 = next(r for r in results if r.recipe == llm_prune("sparsegpt", "2:4"))
    model, _ = pruned_2of4.load_model()
    figures["llm_2of4_groups_violating"] = sum(
        int(((lin.weight.reshape(lin.out_features, -1, 4) != 0).sum(-1) > 2).sum())
        for lin in _llm.block_linears(model).values())
    # This model has no outlier channels; give it some by an exact reparametrization (the same function)
    # and prune again: magnitude is fooled by the rescaled weights, Wanda's |W| x ||x|| is not.
    trained = _llm.pretrained(lm_train_config(LLM_BASE), cache=cache, progress=progress)
    val = trained.corpus.ids("val")
    calib = _llm.calibration_ids(trained.corpus, n_seqs=32, block_size=trained.model.config.block_size, seed=LLM_BASE.seed)
    outlier = _llm.with_outlier_channels(trained.model)
    outlier_bpc = _llm.evaluate_bpc(outlier, val).bits_per_char
    figures["llm_outlier_fp_shift_bpc"] = abs(outlier_bpc - base.val_bpc)
    for method in ("magnitude", "wanda"):
        pruned = _llm.sparsify(outlier, method=method, amount=0.5, calib=calib)
        figures[f"llm_outlier_{method}_50_delta_bpc"] = _llm.evaluate_bpc(pruned, val).bits_per_char - outlier_bpc
    figures["llm_outlier_wanda_over_magnitude_50"] = (figures["llm_outlier_wanda_50_delta_bpc"]
                                                      / figures["llm_outlier_magnitude_50_delta_bpc"])
    # Chapter 13's draft model for speculative decoding, trained (and cached) here with the rest of the models.
    figures["llm_draft_val_bpc"] = _llm.pretrained(LLM_DRAFT, cache=cache, progress=progress).meta["val_bpc"]
    figures["llm_outlier_wanda_shift_bpc"] = abs(figures["llm_outlier_wanda_50_delta_bpc"]
                                                 - figures["llm_50_wanda_delta_bpc"])
    return rows, figures


def hard(*, cache: str | os.PathLike | None, progress: bool | None) -> tuple[list[dict], dict[str, Any]]:
    """Issue 15's harder embedded task (MNIST-1D): baselines that differ by tens of points, then int4 PTQ vs
    QAT, distillation and gradual vs one-shot pruning on the 1-D CNN, each on every seed of HARD_SEEDS (its own
    split, initialization and CNN, trained once and shared by the three).

    Figures without a suffix are the first seed's (the runs the chapters show), except ``kd_*``, means over
    the seeds as chapter 5's; ``*_seed_min`` / ``*_seed_max`` are the worst seed, the ones held to bars.
    """
    from .presets import (HARD_BASELINES, HARD_KD_STUDENT, HARD_KD_TEACHER, HARD_PRUNE_GRADUAL, HARD_PRUNE_ONESHOT,
                          HARD_QUANT_BASE, HARD_QUANT_RUNS, HARD_SEEDS)

    def tag(seed: int) -> str:
        return "" if seed == HARD_SEEDS[0] else f"_seed{seed}"

    base = {name: run(r, cache=cache, progress=progress) for name, r in HARD_BASELINES.items()}
    figures: dict[str, Any] = {f"hard_baseline_acc_{name}": bars.accuracy(r) for name, r in base.items()}
    rows = [{"name": f"hard_{name}", **r.summary()} for name, r in base.items()]
    # Distillation first: it trains each seed's CNN (the teacher), which the other two start from.
    per_seed = {seed: distillation_runs(seed, teacher=HARD_KD_TEACHER, student=HARD_KD_STUDENT, cache=cache,
                                        progress=progress) for seed in HARD_SEEDS}
    mean = {k: sum(bars.accuracy(runs[k]) for runs in per_seed.values()) / len(per_seed)
            for k in ("teacher", "alone", "distilled")}
    figures["kd_gain_pp_hard"] = 100 * (mean["distilled"] - mean["alone"])
    figures["kd_gain_pp_hard_seed_min"] = min(-_drop_pp(runs["alone"], runs["distilled"]) for runs in per_seed.values())
    figures["kd_student_alone_acc_hard"], figures["kd_student_distilled_acc_hard"] = mean["alone"], mean["distilled"]
    rows += [{"name": f"hard_kd_{kind}_seed{seed}", **r.summary()}
             for seed, runs in per_seed.items() for kind, r in runs.items()]
    drops: dict[str, list[Fraction]] = {name: [] for name in HARD_QUANT_RUNS}
    gradual_gain = []
    for seed in HARD_SEEDS:
        fp32 = run(HARD_QUANT_BASE.replace(seed=seed), cache=cache, progress=progress)
        for name, kw in HARD_QUANT_RUNS.items():
            r = run(HARD_QUANT_BASE.replace(seed=seed, **kw), cache=cache, progress=progress)
            drops[name].append(_drop_pp(fp32, r))
            rows.append({"name": f"hard_cnn_{name}{tag(seed)}", **r.summary(), "acc_drop_pp": float(_drop_pp(fp32, r))})
        oneshot = run(HARD_PRUNE_ONESHOT.replace(seed=seed), cache=cache, progress=progress)
        gradual = run(HARD_PRUNE_GRADUAL.replace(seed=seed), cache=cache, progress=progress)
        # Positive: gradual pruning keeps more accuracy than one-shot at the same sparsity and fine-tuning.
        gradual_gain.append(_drop_pp(gradual, oneshot))  # = acc(gradual) - acc(oneshot), in points
        pct = round(100 * HARD_PRUNE_ONESHOT.prune_amount)
        rows += [{"name": f"hard_cnn_{kind}_{pct}{tag(seed)}", **r.summary(), "acc_drop_pp": float(_drop_pp(fp32, r))}
                 for kind, r in (("oneshot", oneshot), ("gradual", gradual))]
    for name, values in drops.items():
        figures[f"{name}_acc_drop_pp_hard"] = values[0]
    figures["ptq_int4_per_tensor_acc_drop_pp_hard_seed_min"] = min(drops["ptq_int4_per_tensor"])
    # What QAT still loses as a fraction of what PTQ loses, on the worst seed.
    figures["qat_over_ptq_int4_drop_hard_seed_max"] = max(
        q / p if p > 0 else float("inf") for q, p in zip(drops["qat_int4"], drops["ptq_int4_per_tensor"]))
    figures["prune_gradual_vs_oneshot_pp_hard"] = gradual_gain[0]
    figures["prune_gradual_vs_oneshot_pp_hard_seed_min"] = min(gradual_gain)
    return rows, figures


GROUPS: dict[str, Callable[..., tuple[list[dict], dict[str, Any]]]] = {
    "baseline": baseline, "pruning": pruning, "quant": quant, "deploy": deploy, "distributed": distributed,
    "serving": serving, "llm": llm, "llm-serve": llm_serve, "hard": hard, "margins": seed_margins}


def run_bench(only: list[str] | None = None, *, cache: str | os.PathLike | None = None,
              progress: bool | None = None) -> dict[str, Any]:
    """Run the benchmark groups (all but "margins", or those in `only`).

    Returns ``{"machine", "groups", "results", "figures", "bars"}``; "bars" holds every figure that
    has a bar in :data:`workbench.bars.BARS` with its value, the bar and whether it was met.
    """
    names = [g for g in GROUPS if g != "margins"] if not only else list(only)
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise WorkbenchError(f"unknown bench group(s) {', '.join(unknown)}; known groups: {', '.join(GROUPS)}")
    report: dict[str, Any] = {"machine": machine_info(), "groups": names, "results": [], "figures": {}}
    for name in names:
        rows, figures = GROUPS[name](cache=cache, progress=progress)
        report["results"] += [{"group": name, **row} for row in rows]
        report["figures"].update(figures)
    # Every figure with a bar (workbench.bars.BARS), checked exactly: counts and Fractions as such.
    report["bars"] = bars.evaluate(report["figures"])
    report["figures"] = {k: _plain(v) for k, v in report["figures"].items()}
    return report


def _plain(value: Any) -> Any:
    """JSON-ready: an exact Fraction becomes its nearest float."""
    return float(value) if isinstance(value, Fraction) else value


def failed_bars(report: dict[str, Any]) -> list[str]:
    """One line per figure of `report` that missed its bar (empty: all met)."""
    config = report["machine"].get("numeric_config", "")
    return [f"{name} = {b['value']:.6g} misses its bar ({b['bar']}) under {config}"
            for name, b in report.get("bars", {}).items() if not b["ok"]]


def write_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False))
    os.replace(tmp, path)
    return path

