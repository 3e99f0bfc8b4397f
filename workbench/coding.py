"""Deep Compression's encoding (Han et al., ICLR 2016): Huffman coding of cluster indices and relative positions.

After pruning and weight sharing (``workbench.cluster``), :func:`encode` writes each shared layer as
two real bit streams: the cluster index of every stored entry and its relative position (the gap
to the previous entry, :func:`workbench.sparse.relative_entries`), each coded with canonical
Huffman codes fitted to its symbol counts. :func:`decode` rebuilds the weights bit for bit, and
``Encoded.nbytes()`` counts every byte a decoder needs, so a compression ratio is a measured fact,
not an estimate::

    codebooks = cluster.share_weights(model, bits=5)
    cluster.finetune_centroids(model, codebooks, data, epochs=3)
    enc = encode(model, codebooks)
    compression_ratio(measure.param_bytes(model), enc)
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .cluster import Codebook, codebook_layers
from .errors import WorkbenchError
from .sparse import relative_entries

__all__ = [
    "huffman_code_lengths", "canonical_codes", "encode_symbols", "decode_symbols",
    "Encoded", "encode", "decode", "compression_ratio",
]

HEADER_BYTES = 4  # per layer: the number of (index, gap) entries as a uint32, so the decoder knows where to stop


# ----------------------------------------------------------------------------------------------
# Huffman coding


def huffman_code_lengths(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Optimal prefix-code lengths for symbol frequencies `counts` (Huffman's algorithm).

    Repeatedly merge the two least frequent nodes; a symbol's code length is its leaf's depth.
    Unused symbols (count 0) get length 0 (no code). A single used symbol gets a 1-bit code.
    Ties are broken by creation order, so the result is deterministic.

    Example:
        >>> huffman_code_lengths([5, 1, 1, 2]).tolist()
        [1, 3, 3, 2]
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    if len(used) == 1:
        lengths[used] = 1
    if len(used) <= 1:
        return lengths
    heap = [(int(counts[s]), i) for i, s in enumerate(used)]
    heapq.heapify(heap)
    parent: list[int] = [0] * (2 * len(used) - 1)
    node = len(used)
    while len(heap) > 1:
        (ca, a), (cb, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (ca + cb, node))
        node += 1
    depth = [0] * len(parent)
    for n in range(len(parent) - 2, -1, -1):  # parents are created after their children
        depth[n] = depth[parent[n]] + 1
    lengths[used] = depth[:len(used)]
    return lengths


def canonical_codes(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Canonical Huffman codes (as integers) for code lengths; symbols of length 0 get -1.

    Codes are handed out in order of (length, symbol): each is the previous one plus 1, shifted
    left when the length grows. So a decoder needs only the lengths (the stored table), and codes of
    one length are consecutive integers.

    Example:
        >>> canonical_codes([1, 3, 3, 2]).tolist()   # 0, 110, 111, 10
        [0, 6, 7, 2]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.full(len(lengths), -1, dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths > 0), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s], prev = code, int(lengths[s])
        code += 1
    return codes


def encode_symbols(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Write each symbol's canonical code (for code `lengths`), most significant bit first, into bytes.

    Returns:
        ``(stream, nbits)``: the bytes (the last one zero-padded) and the number of bits used.

    Example:
        >>> encode_symbols(np.array([0, 3, 1]), np.array([1, 3, 3, 2]))   # 0 10 110 -> 01011000
        (b'X', 6)
    """
    symbols = np.asarray(symbols, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(symbols) and (symbols.min() < 0 or symbols.max() >= len(lengths) or (lengths[symbols] == 0).any()):
        raise WorkbenchError("every symbol to encode needs a code (a length > 0 in the table)")
    codes, ls = canonical_codes(lengths)[symbols], lengths[symbols]
    if len(symbols) == 0:
        return b"", 0
    width = int(ls.max())
    j = np.arange(width)
    shift = ls[:, None] - 1 - j
    bits = (codes[:, None] >> np.maximum(shift, 0)) & 1
    bits = bits[shift >= 0].astype(np.uint8)  # row-major: symbol after symbol, code bits in order
    return np.packbits(bits).tobytes(), len(bits)


def decode_symbols(stream: bytes, nbits: int, lengths: np.ndarray, count: int) -> np.ndarray:
    """Read `count` symbols back from a stream written by :func:`encode_symbols` with the same lengths.

    Every bit position is looked at once, vectorized: the `width` bits starting there, read as an
    integer, fall into the left-aligned range of exactly one canonical code (codes increase with
    (length, symbol)). Then a short walk hops from each code's start to the next.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.array(sorted(np.flatnonzero(lengths > 0), key=lambda s: (lengths[s], s)), dtype=np.int64)
    codes, ls = canonical_codes(lengths)[order], lengths[order]
    width = int(ls.max())
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:nbits].astype(np.int64)
    bits = np.concatenate([bits, np.zeros(width, dtype=np.int64)])
    # The `width` bits starting at every position, as an integer: the code there, left-aligned.
    window = np.zeros(nbits, dtype=np.int64)
    for j in range(width):
        window = (window << 1) | bits[j:j + nbits]
    # Left-aligned canonical codes increase with (length, symbol): the code starting at a position
    # is the last one whose left-aligned value is <= the window there.
    aligned = codes << (width - ls)
    rank = np.searchsorted(aligned, window, side="right") - 1
    step = ls[rank].tolist()
    pos, starts = 0, []
    for _ in range(count):  # each symbol starts where the previous one ended
        if pos >= nbits:
            raise WorkbenchError("the bit stream ended before all its symbols were decoded: it is damaged")
        starts.append(pos)
        pos += step[pos]
    if pos != nbits:
        raise WorkbenchError(f"decoded {count} symbols in {pos} bits but the stream holds {nbits}: it is damaged")
    return order[rank[starts]]


# ----------------------------------------------------------------------------------------------
# The encoded model


@dataclass
class Encoded:
    """A model's weights after Deep Compression, as the bytes a decoder needs.

    ``layers[name]`` holds, for each shared layer: ``shape``, ``bits``, ``centroids`` (float32
    array), ``entries`` (index/gap pairs, fillers included), ``nonzero``, the two bit streams
    ``index_stream`` (cluster index per entry; symbol ``2**bits`` marks a filler) and ``gap_stream``
    (relative position per entry) with their lengths in bits (``index_bits``, ``gap_bits``), the
    code tables ``index_table`` and ``gap_table`` as stored, and ``bias`` (float32 array or None).
    ``dense`` holds every other tensor of the state dict as it is (e.g. BatchNorm statistics).

    How a code table is stored: canonical Huffman codes are fully determined by their lengths, so a
    table is one byte per symbol of the alphabet (its code length, 0 = unused); the indices'
    alphabet is ``2**bits + 1`` symbols (the last one a filler), the gaps' ``2**relative_index_bits``.
    With ``huffman=False`` every code has the same width, and the table is that width, one byte.
    """

    layers: dict[str, dict]
    relative_index_bits: int
    huffman: bool
    dense: dict[str, np.ndarray] = field(default_factory=dict)

    def _layer_bytes(self, e: dict) -> dict[str, int]:
        return {"index": len(e["index_stream"]), "position": len(e["gap_stream"]),
                "codebook": e["centroids"].nbytes, "tables": len(e["index_table"]) + len(e["gap_table"]),
                "header": HEADER_BYTES, "bias": e["bias"].nbytes if e["bias"] is not None else 0}

    def nbytes(self) -> int:
        """Total bytes: every bit stream, codebook, code table, entry count and float32 bias, plus `dense`."""
        return (sum(sum(self._layer_bytes(e).values()) for e in self.layers.values())
                + sum(a.nbytes for a in self.dense.values()))

    def breakdown(self) -> list[dict]:
        """One row per layer: weights, non-zeros, entries, average index and position bits, and bytes by part."""
        rows = []
        for name, e in self.layers.items():
            parts = self._layer_bytes(e)
            rows.append({"layer": name, "weights": int(np.prod(e["shape"])), "nonzero": e["nonzero"],
                         "entries": e["entries"], "bits": e["bits"],
                         "index_bits_per_entry": e["index_bits"] / max(e["entries"], 1),
                         "position_bits_per_entry": e["gap_bits"] / max(e["entries"], 1),
                         **{f"{k}_bytes": v for k, v in parts.items()}, "bytes": sum(parts.values())})
        return rows


def _table(lengths: np.ndarray, huffman: bool) -> bytes:
    if huffman:
        return bytes(lengths.astype(np.uint8).tolist())
    return bytes([int(lengths.max())])


def _lengths(table: bytes, huffman: bool) -> np.ndarray:
    if huffman:
        return np.frombuffer(table, dtype=np.uint8).astype(np.int64)
    return np.full(2 ** table[0], table[0], dtype=np.int64)


def _fixed_lengths(alphabet_used: int) -> np.ndarray:
    width = max(1, math.ceil(math.log2(alphabet_used)))
    return np.full(2 ** width, width, dtype=np.int64)


def _key(layer: str, tensor: str) -> str:
    """The state-dict key of a layer's tensor (a model that is itself one layer has no prefix)."""
    return f"{layer}.{tensor}" if layer else tensor


def encode(model: nn.Module, codebooks: Mapping[str, Codebook], *, relative_index_bits: int = 5,
           huffman: bool = True) -> Encoded:
    """Encode the shared weights: per layer, relative positions and cluster indices as real bit streams.

    Args:
        model: a model whose shared layers equal their codebooks (after
            :func:`workbench.cluster.share_weights` and optionally
            :func:`workbench.cluster.finetune_centroids`); its other tensors are stored as they are.
        codebooks: ``{layer name: Codebook}`` from :func:`workbench.cluster.share_weights`.
        relative_index_bits: bits per gap before Huffman coding (5 in the paper for fc layers); the
            gaps are :func:`workbench.sparse.relative_entries`, as :func:`workbench.sparse.sparse_sizes` counts them.
        huffman: True: canonical Huffman codes fitted to each stream's symbol counts. False:
            fixed-width codes (``bits`` per index, ``bits + 1`` if the layer has fillers; and
            `relative_index_bits` per gap), i.e. the paper's size before Huffman coding.

    Returns:
        The :class:`Encoded` model; :func:`decode` gives the weights back exactly.

    Raises:
        WorkbenchError: if a layer's weight no longer equals ``codebook.weight()``.

    Example:
        >>> enc = encode(model, codebooks); enc.nbytes()
    """
    if isinstance(relative_index_bits, bool) or not isinstance(relative_index_bits, int) or \
            not 1 <= relative_index_bits <= 16:
        raise WorkbenchError(f"relative_index_bits must be an integer from 1 to 16 (5 in the paper), "
                             f"got {relative_index_bits!r}")
    layers = codebook_layers(model, codebooks)
    out: dict[str, dict] = {}
    for name, layer in layers.items():
        book = codebooks[name]
        if not torch.equal(layer.weight.detach().float(), book.weight()):
            raise WorkbenchError(f"the weights of {name} no longer equal their codebook's shared values; "
                                 "encode right after share_weights / finetune_centroids")
        flat = book.indices.reshape(-1).numpy()
        gaps, real = relative_entries(flat >= 0, index_bits=relative_index_bits)
        k = len(book.centroids)
        symbols = np.full(len(gaps), k, dtype=np.int64)  # symbol k: a filler (a stored zero)
        symbols[real] = flat[flat >= 0]
        if huffman:
            idx_len = huffman_code_lengths(np.bincount(symbols, minlength=k + 1))
            gap_len = huffman_code_lengths(np.bincount(gaps, minlength=2 ** relative_index_bits))
        else:
            idx_len = _fixed_lengths(k + 1 if (~real).any() else k)
            gap_len = _fixed_lengths(2 ** relative_index_bits)
        index_stream, index_bits = encode_symbols(symbols, idx_len)
        gap_stream, gap_bits = encode_symbols(gaps, gap_len)
        bias = getattr(layer, "bias", None)
        out[name] = {
            "shape": tuple(book.indices.shape), "bits": book.bits, "centroids": book.centroids.numpy().copy(),
            "entries": len(gaps), "nonzero": int(real.sum()),
            "index_table": _table(idx_len, huffman), "gap_table": _table(gap_len, huffman),
            "index_stream": index_stream, "index_bits": index_bits,
            "gap_stream": gap_stream, "gap_bits": gap_bits,
            "bias": bias.detach().numpy().copy() if bias is not None else None,
        }
    coded = {_key(n, "weight") for n in out} | {_key(n, "bias") for n, e in out.items() if e["bias"] is not None}
    dense = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if k not in coded}
    return Encoded(layers=out, relative_index_bits=relative_index_bits, huffman=huffman, dense=dense)


def decode(encoded: Encoded) -> dict[str, torch.Tensor]:
    """Rebuild the state dict from the bit streams: ``model.load_state_dict(decode(enc))``.

    Each weight is the codebook value of its decoded index, at the position given by the running
    sum of the decoded gaps; fillers and all other positions are zero.
    """
    state: dict[str, torch.Tensor] = {}
    for name, e in encoded.layers.items():
        k = len(e["centroids"])
        idx_len = _lengths(e["index_table"], encoded.huffman)
        gap_len = _lengths(e["gap_table"], encoded.huffman)
        symbols = decode_symbols(e["index_stream"], e["index_bits"], idx_len, e["entries"])
        gaps = decode_symbols(e["gap_stream"], e["gap_bits"], gap_len, e["entries"])
        positions = np.cumsum(gaps)
        real = symbols < k
        flat = np.zeros(int(np.prod(e["shape"])), dtype=np.float32)
        flat[positions[real]] = e["centroids"][symbols[real]]
        state[_key(name, "weight")] = torch.from_numpy(flat.reshape(e["shape"]))
        if e["bias"] is not None:
            state[_key(name, "bias")] = torch.from_numpy(e["bias"].copy())
    state.update({k: torch.from_numpy(v.copy()) for k, v in encoded.dense.items()})
    return state


def compression_ratio(dense_bytes: int, encoded: Encoded) -> float:
    """``dense_bytes / encoded.nbytes()``; pass the float32 size, e.g. ``measure.param_bytes(dense_model)``."""
    if isinstance(dense_bytes, bool) or not isinstance(dense_bytes, (int, np.integer)) or dense_bytes <= 0:
        raise WorkbenchError(f"dense_bytes must be a positive number of bytes, got {dense_bytes!r}")
    return int(dense_bytes) / encoded.nbytes()
