"""Large models: a small GPT trained offline on ``pydoc_data.topics``, its weights compressed
as large language models' are (per-group RTN, GPTQ, AWQ, SmoothQuant W8A8, magnitude/Wanda/SparseGPT
pruning, 2:4), measured in validation bits per character; and generating with it (a KV cache, speculative
decoding: :mod:`workbench.llm.decode`; in ONNX Runtime with past key/values and MatMulNBits int4:
:mod:`workbench.llm.onnx_gpt`).

Example:
    >>> from workbench import llm
    >>> t = llm.pretrained()                                   # cached; ~1 min on 2 cores on a miss
    >>> calib = llm.calibration_ids(t.corpus)
    >>> q, packed = llm.quantize_weights(t.model, llm.WeightQuant(4, 32), method="gptq", calib=calib)
    >>> llm.evaluate_bpc(q, t.corpus.ids("val")).bits_per_char, llm.memory(packed)["bits_per_weight"]
"""

from __future__ import annotations

from .awq import awq, awq_search
from .calib import InputStats, block_linears, calibration_ids, collect_inputs, fold_scale, with_outlier_channels
from . import checkpoint
from .corpus import CORPORA, CharTokenizer, Corpus, load_corpus, unigram_entropy
from .decode import (SpeculativeResult, expected_tokens_per_call, generate_tokens, kv_cache_bytes,
                     speculative_generate, tokens_per_second, verify)
from .gpt import GPT, GPTConfig, KVCache, generate
from . import onnx_gpt
from .onnx_gpt import OrtGPT, evaluate_bpc_ort, export_gpt, generate_tokens_ort, quantize_int4
from .smooth import ChannelStats, activation_stats, smoothquant, smoothquant_scale, w8a8
from .sparsify import METHODS as PRUNE_METHODS
from .sparsify import magnitude_scores, nm_mask, row_mask, sparsegpt, sparsify, wanda_scores
from .trainer import BPC, TrainConfig, Trained, evaluate_bpc, pretrained, train
from .weights import (PackedWeight, WeightQuant, closed_form_bits_per_weight, gptq, layer_error, memory, pack,
                      pack_bits, quantize_weights, rtn, unpack_bits)

__all__ = [
    "CORPORA", "CharTokenizer", "Corpus", "load_corpus", "unigram_entropy", "checkpoint",
    "GPT", "GPTConfig", "KVCache", "generate",
    "generate_tokens", "kv_cache_bytes", "tokens_per_second", "speculative_generate", "SpeculativeResult", "verify",
    "expected_tokens_per_call", "onnx_gpt", "OrtGPT", "export_gpt", "generate_tokens_ort", "evaluate_bpc_ort",
    "quantize_int4",
    "TrainConfig", "Trained", "BPC", "train", "evaluate_bpc", "pretrained",
    "InputStats", "block_linears", "calibration_ids", "collect_inputs", "fold_scale", "with_outlier_channels",
    "WeightQuant", "PackedWeight", "rtn", "gptq", "pack", "pack_bits", "unpack_bits", "quantize_weights", "memory",
    "closed_form_bits_per_weight", "layer_error",
    "awq", "awq_search",
    "ChannelStats", "activation_stats", "smoothquant", "smoothquant_scale", "w8a8",
    "PRUNE_METHODS", "magnitude_scores", "wanda_scores", "row_mask", "nm_mask", "sparsegpt", "sparsify",
]
