"""Deep Compression's encoding: Huffman codes vs an optimal-cost reference, bit streams, exact encode/decode."""

import copy
import heapq
import math

import numpy as np
import pytest
import torch
from torch import nn

from workbench import WorkbenchError, build, cluster, coding, measure, prune, sparse


def pruned_lenet300(amount=0.92, seed=0):
    model = build("lenet300", input_shape=(1, 28, 28), num_classes=10, seed=seed)
    prune.apply_masks(model, prune.magnitude_masks(model, amount, scope="layer"))
    return prune.finalize(model)


@pytest.fixture(scope="module")
def shared():
    model = pruned_lenet300()
    return model, cluster.share_weights(model, bits=5)


# --- Huffman --------------------------------------------------------------------------------------


def optimal_cost(counts):
    """Reference: the cost of an optimal prefix code is the sum of Huffman's merged weights."""
    heap = [c for c in counts if c > 0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


COUNTS = {
    "skewed": [500, 200, 100, 50, 25, 12, 6, 3, 1, 1],
    "uniform": [7] * 16,
    "with unused": [0, 40, 0, 3, 3, 90, 0, 1],
    "geometric-ish": list(np.random.default_rng(3).geometric(0.2, size=33)),
}


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_huffman_is_optimal_canonical_prefix_free_and_within_the_entropy_bound(counts):
    counts = np.array(counts)
    lengths = coding.huffman_code_lengths(counts)
    used = counts > 0
    assert np.all((lengths > 0) == used)
    assert int((counts * lengths).sum()) == optimal_cost(counts.tolist())
    assert sum(2.0 ** -lengths[used]) == pytest.approx(1.0)   # complete: Kraft equality
    p = counts[used] / counts.sum()
    entropy, average = -(p * np.log2(p)).sum(), (p * lengths[used]).sum()
    assert entropy - 1e-12 <= average < entropy + 1
    codes = coding.canonical_codes(lengths)
    words = {s: format(int(codes[s]), f"0{lengths[s]}b") for s in np.flatnonzero(used)}
    for a in words:
        for b in words:
            assert a == b or not words[b].startswith(words[a]), (words[a], words[b])
    # Canonical: in (length, symbol) order, each code is the previous plus one, shifted to its length.
    order = sorted(words, key=lambda s: (lengths[s], s))
    for prev, nxt in zip(order, order[1:]):
        assert codes[nxt] == (codes[prev] + 1) << int(lengths[nxt] - lengths[prev])
    assert codes[order[0]] == 0


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_symbol_streams_match_a_naive_bit_string_and_decode_back(counts):
    counts = np.array(counts)
    lengths = coding.huffman_code_lengths(counts)
    codes = coding.canonical_codes(lengths)
    symbols = np.random.default_rng(0).choice(len(counts), size=2000, p=counts / counts.sum())
    stream, nbits = coding.encode_symbols(symbols, lengths)
    naive = "".join(format(int(codes[s]), f"0{lengths[s]}b") for s in symbols)
    assert nbits == len(naive) == int(lengths[symbols].sum())
    assert len(stream) == math.ceil(nbits / 8)
    assert stream == int(naive + "0" * (-nbits % 8), 2).to_bytes(len(stream), "big")
    np.testing.assert_array_equal(coding.decode_symbols(stream, nbits, lengths, len(symbols)), symbols)


def test_single_symbol_alphabet_gets_a_one_bit_code():
    lengths = coding.huffman_code_lengths([0, 9, 0])
    assert lengths.tolist() == [0, 1, 0]
    stream, nbits = coding.encode_symbols(np.full(9, 1), lengths)
    assert (stream, nbits) == (b"\x00\x00", 9)
    assert coding.decode_symbols(stream, nbits, lengths, 9).tolist() == [1] * 9
    assert coding.huffman_code_lengths([0, 0]).tolist() == [0, 0]
    with pytest.raises(WorkbenchError, match="needs a code"):
        coding.encode_symbols(np.array([0]), lengths)


def test_damaged_stream_is_detected():
    lengths = coding.huffman_code_lengths([5, 1, 1, 2])
    stream, nbits = coding.encode_symbols(np.array([0, 1, 2, 3, 0]), lengths)
    with pytest.raises(WorkbenchError, match="damaged"):
        coding.decode_symbols(stream, nbits, lengths, 6)
    with pytest.raises(WorkbenchError, match="damaged"):
        coding.decode_symbols(stream, nbits, lengths, 4)


# --- encode, decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("huffman", [True, False])
def test_encode_decode_round_trip_is_exact(shared, huffman):
    model, books = shared
    enc = coding.encode(model, books, huffman=huffman)
    state = coding.decode(enc)
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    rebuilt = build("lenet300", input_shape=(1, 28, 28), num_classes=10, seed=5)
    rebuilt.load_state_dict(state)
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(rebuilt(x), model(x))


def test_nbytes_is_the_sum_of_the_real_parts(shared):
    model, books = shared
    enc = coding.encode(model, books)
    total = 0
    for name, e in enc.layers.items():
        k = len(books[name].centroids)
        assert len(e["index_table"]) == k + 1 and len(e["gap_table"]) == 2 ** 5  # one byte per symbol
        assert len(e["index_stream"]) == math.ceil(e["index_bits"] / 8)
        assert len(e["gap_stream"]) == math.ceil(e["gap_bits"] / 8)
        total += (len(e["index_stream"]) + len(e["gap_stream"]) + 4 * k + len(e["index_table"])
                  + len(e["gap_table"]) + coding.HEADER_BYTES + e["bias"].nbytes)
    assert enc.nbytes() == total == sum(row["bytes"] for row in enc.breakdown())
    rows = {row["layer"]: row for row in enc.breakdown()}
    assert rows["net.1"]["nonzero"] == int((model.net[1].weight != 0).sum())
    # Huffman never loses to the fixed-width code on the same streams (up to the one-byte-per-symbol tables).
    fixed = coding.encode(model, books, huffman=False)
    assert enc.nbytes() < fixed.nbytes()
    assert coding.compression_ratio(measure.param_bytes(model), enc) == measure.param_bytes(model) / enc.nbytes()


def test_fixed_width_streams_cost_bits_per_entry(shared):
    model, books = shared
    fixed = coding.encode(model, books, huffman=False, relative_index_bits=4)
    for name, e in fixed.layers.items():
        gaps, real = sparse.relative_entries(books[name].indices >= 0, index_bits=4)
        width = 5 + int((~real).any())      # a filler needs a 33rd symbol
        assert e["index_bits"] == e["entries"] * width and e["gap_bits"] == e["entries"] * 4
        sizes = sparse.sparse_sizes(model.get_submodule(name).weight, value_bits=width, relative_index_bits=4)
        assert len(e["index_stream"]) + len(e["gap_stream"]) in (sizes.relative, sizes.relative + 1)


def test_encode_refuses_stale_codebooks_and_bad_settings(shared):
    model, books = shared
    model = copy.deepcopy(model)
    with pytest.raises(WorkbenchError, match="relative_index_bits"):
        coding.encode(model, books, relative_index_bits=0)
    with torch.no_grad():
        model.net[1].weight.mul_(1.01)
    with pytest.raises(WorkbenchError, match="no longer equal"):
        coding.encode(model, books)
    with pytest.raises(WorkbenchError, match="unknown layer"):
        coding.encode(model, {"fc9": books["net.1"]})
    with pytest.raises(WorkbenchError, match="dense_bytes"):
        coding.compression_ratio(0, coding.encode(*shared))


def test_conv_layers_with_8_bit_codebooks_round_trip():
    model = build("lenet5", input_shape=(1, 28, 28), num_classes=10)
    prune.apply_masks(model, prune.magnitude_masks(model, {"classifier.1": 0.9}))
    bits = {**cluster.layer_bits(model, conv=8, fc=5), "classifier.3": 3}
    books = cluster.share_weights(prune.finalize(model), bits=bits)
    state = coding.decode(coding.encode(model, books))   # conv shapes and 257-symbol alphabets
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_model_that_is_one_layer_round_trips():
    layer = nn.Linear(20, 10)
    state = coding.decode(coding.encode(layer, cluster.share_weights(layer, bits=2)))
    assert state.keys() == layer.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())
