"""Sparse storage accounting: hand-computed bytes, scipy's CSR, break-even densities, whole models."""

import numpy as np
import pytest
import torch
from torch import nn

from workbench import WorkbenchError, sparse
from workbench.sparse import SparseSizes, break_even_density, model_sparse_sizes, relative_entries, sparse_sizes

# 3x4, 5 non-zeros at flat positions 0, 3, 8, 9, 11.
A = np.array([[1.0, 0, 0, 2], [0, 0, 0, 0], [3, 4, 0, 5]], dtype=np.float32)


def random_sparse(shape, density, seed=0):
    rng = np.random.default_rng(seed)
    numel = int(np.prod(shape))
    a = np.zeros(numel, dtype=np.float32)
    k = round(density * numel)
    a[rng.choice(numel, size=k, replace=False)] = rng.uniform(0.5, 1.5, size=k)
    return a.reshape(shape)


def with_nnz(shape, nnz, seed=0):
    return random_sparse(shape, nnz / int(np.prod(shape)), seed)


def naive_relative_entries(flat, index_bits):
    """The encoding written out entry by entry, to check the vectorized count against."""
    max_gap = 2**index_bits - 1
    entries, previous = [], 0
    for position in np.flatnonzero(flat):
        while position - previous > max_gap:
            previous += max_gap
            entries.append((0.0, max_gap))
        entries.append((flat[position], position - previous))
        previous = position
    return entries


@pytest.mark.parametrize(
    ("value_bits", "index_bits", "rel_bits", "expected"),
    [
        # dense 12*4=48; csr 5*4 + 5*4 + (3+1)*4 = 56; bitmask ceil(12/8)=2 + 5*4 = 22;
        # relative gaps 0,3,5,1,2 all <= 31: 5 entries * (32+5) = 185 bits -> 24 bytes.
        (32, 32, 5, dict(dense=48, csr=56, bitmask=22, relative=24, relative_entries=5)),
        # dense 12; csr 5 + 5*2 + 4*2 = 23; bitmask 2 + 5 = 7; relative 5 * (8+4) = 60 bits -> 8 bytes.
        (8, 16, 4, dict(dense=12, csr=23, bitmask=7, relative=8, relative_entries=5)),
        # dense ceil(12*5/8)=8; csr ceil(25/8)=4 + ceil(35/8)=5 + ceil(28/8)=4 = 13;
        # bitmask 2 + 4 = 6; relative gaps 0,3,5,1,2 with max 3: gap 5 needs 1 filler -> 6 entries,
        # 6 * (5+2) = 42 bits -> 6 bytes.
        (5, 7, 2, dict(dense=8, csr=13, bitmask=6, relative=6, relative_entries=6)),
    ],
)
def test_hand_computed_3x4(value_bits, index_bits, rel_bits, expected):
    s = sparse_sizes(A, value_bits=value_bits, index_bits=index_bits, relative_index_bits=rel_bits)
    assert (s.numel, s.nonzero) == (12, 5)
    assert {k: getattr(s, k) for k in expected} == expected
    assert s.density == pytest.approx(5 / 12)


def test_best_of_hand_example_is_bitmask():
    assert sparse_sizes(A).best == "bitmask"
    assert sparse_sizes(torch.from_numpy(A)) == sparse_sizes(A)


@pytest.mark.parametrize(
    ("positions", "length", "bits", "fillers", "value_bits", "nbytes"),
    [
        # bits=2 -> max gap 3. Non-zeros at 1 and 10: gaps 1 and 9; 9 = 3+3+3 -> fillers at 4 and 7.
        # 4 entries * (8+2) = 40 bits = 5 bytes.
        ([1, 10], 12, 2, 2, 8, 5),
        # Same with fp32 values: 4 * (32+2) = 136 bits = 17 bytes.
        ([1, 10], 12, 2, 2, 32, 17),
        # First non-zero at 0 stores gap 0; then gap 20 -> ceil(20/3)-1 = 6 fillers;
        # 8 entries * (32+2) = 272 bits = 34 bytes.
        ([0, 20], 30, 2, 6, 32, 34),
        # First entry stores its absolute index: at 5, gap 5 > 3 -> 1 filler at 3, then gap 2.
        # 2 entries * (8+2) = 20 bits -> 3 bytes. Trailing zeros cost nothing.
        ([5], 40, 2, 1, 8, 3),
        # Gap exactly 2**bits - 1 = 7 fits: no filler; 2 * (8+3) = 22 bits -> 3 bytes.
        ([7, 14], 15, 3, 0, 8, 3),
        # Gap 8 = max + 1 needs one filler (at 7), then gap 1: 2 entries * (8+3) = 22 bits -> 3 bytes.
        ([8], 9, 3, 1, 8, 3),
    ],
)
def test_relative_index_fillers_by_hand(positions, length, bits, fillers, value_bits, nbytes):
    a = np.zeros(length)
    a[positions] = 1.0
    s = sparse_sizes(a, value_bits=value_bits, relative_index_bits=bits)
    assert s.relative_fillers == fillers
    assert s.relative_entries == len(positions) + fillers
    assert s.relative == nbytes


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("density", [0.02, 0.3, 0.9])
def test_relative_matches_entry_by_entry_encoding(bits, density):
    a = random_sparse((13, 17), density, seed=bits)
    entries = naive_relative_entries(a.reshape(-1), bits)
    assert all(0 <= gap <= 2**bits - 1 for _, gap in entries)
    assert np.flatnonzero(a).tolist() == np.cumsum([g for _, g in entries])[[v != 0 for v, _ in entries]].tolist()
    s = sparse_sizes(a, value_bits=8, relative_index_bits=bits)
    assert s.relative_entries == len(entries)
    assert s.relative == -(-len(entries) * (8 + bits) // 8)
    gaps, real = relative_entries(a != 0, index_bits=bits)
    assert gaps.tolist() == [g for _, g in entries]
    assert real.tolist() == [v != 0 for v, _ in entries]


@pytest.mark.parametrize("index_bits", [1, 3, 5, 8])
def test_relative_entries_walk_back_to_the_positions(index_bits):
    mask = np.random.default_rng(index_bits).random((40, 60)) < 0.04
    mask[0, 0] = True
    gaps, real = relative_entries(torch.from_numpy(mask), index_bits=index_bits)
    assert len(gaps) == sparse_sizes(mask, relative_index_bits=index_bits).relative_entries
    assert gaps.max() <= 2 ** index_bits - 1 and gaps[0] == 0
    np.testing.assert_array_equal(np.cumsum(gaps)[real], np.flatnonzero(mask))


@pytest.mark.parametrize("bits", [62, 63, 64])
def test_wide_relative_indices_need_no_fillers(bits):
    a = np.zeros(1000)
    a[[3, 999]] = 1.0
    s = sparse_sizes(a, value_bits=8, relative_index_bits=bits)
    assert (s.relative_entries, s.relative_fillers) == (2, 0)
    assert relative_entries(a != 0, index_bits=bits)[0].tolist() == [3, 996]


@pytest.mark.parametrize("shape", [(7, 9), (20, 3, 3, 3), (50,), (1, 64)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_csr_counts_match_scipy_and_torch(shape, density):
    sp = pytest.importorskip("scipy.sparse")
    a = random_sparse(shape, density, seed=len(shape))
    m = sp.csr_matrix(a.reshape(shape[0] if len(shape) > 1 else 1, -1))
    s = sparse_sizes(torch.from_numpy(a))
    assert s.nonzero == m.nnz == int(torch.count_nonzero(torch.from_numpy(a)))
    assert len(m.data) == len(m.indices) == s.nonzero
    assert s.csr == 4 * (len(m.data) + len(m.indices) + len(m.indptr))
    assert s.numel == a.size and s.dense == 4 * a.size


@pytest.mark.parametrize("value_bits", [32, 8, 5])
def test_dense_matrix_is_best_dense(value_bits):
    a = torch.rand(16, 32) + 0.1
    s = sparse_sizes(a, value_bits=value_bits)
    assert s.nonzero == s.numel
    assert s.csr > s.dense and s.bitmask > s.dense and s.relative > s.dense
    assert s.relative_fillers == 0
    assert s.best == "dense"


@pytest.mark.parametrize("value_bits", [32, 8])
def test_one_percent_dense_is_cheaper_sparse(value_bits):
    s = sparse_sizes(random_sparse((100, 100), 0.01), value_bits=value_bits, index_bits=16)
    assert s.nonzero == 100
    assert s.csr < s.dense
    assert s.relative < s.dense
    assert s.best != "dense"


@pytest.mark.parametrize(
    ("fmt", "shape", "value_bits", "index_bits"),
    [
        ("csr", (64, 256), 32, 32),
        ("csr", (300, 784), 8, 16),
        ("csr", (20, 1, 5, 5), 16, 32),
        ("csr", (1000,), 32, 32),
        ("bitmask", (64, 256), 32, 32),
        ("bitmask", (300, 784), 8, 32),
        ("bitmask", (50, 20, 5, 5), 16, 32),
    ],
)
def test_closed_form_break_even_is_the_real_crossover(fmt, shape, value_bits, index_bits):
    d = break_even_density(fmt, shape=shape, value_bits=value_bits, index_bits=index_bits)
    numel = int(np.prod(shape))
    k = int(np.ceil(d * numel)) - 1  # largest nnz with density strictly below d
    below = sparse_sizes(with_nnz(shape, k), value_bits=value_bits, index_bits=index_bits)
    above = sparse_sizes(with_nnz(shape, k + 1), value_bits=value_bits, index_bits=index_bits)
    assert getattr(below, fmt) < below.dense
    assert getattr(above, fmt) >= above.dense


@pytest.mark.parametrize(("fmt", "value_bits", "index_bits"), [("csr", 5, 7), ("bitmask", 5, 7), ("csr", 12, 20)])
def test_closed_form_break_even_within_two_percent_for_odd_bit_widths(fmt, value_bits, index_bits):
    shape = (64, 64)
    d = break_even_density(fmt, shape=shape, value_bits=value_bits, index_bits=index_bits)
    below = sparse_sizes(random_sparse(shape, d - 0.02), value_bits=value_bits, index_bits=index_bits)
    above = sparse_sizes(random_sparse(shape, d + 0.02), value_bits=value_bits, index_bits=index_bits)
    assert getattr(below, fmt) < below.dense
    assert getattr(above, fmt) > above.dense


@pytest.mark.parametrize("shape", [(300, 784), (64, 256), (20, 1, 5, 5)])
def test_bitmask_with_fp32_breaks_even_at_31_32(shape):
    assert break_even_density("bitmask", shape=shape) == pytest.approx(1 - 1 / 32, abs=1 / np.prod(shape))


def test_csr_closed_form_formula():
    v, i, rows, numel = 32, 32, 64, 64 * 256
    assert break_even_density("csr", shape=(64, 256)) == pytest.approx((v - (rows + 1) * i / numel) / (v + i))
    assert break_even_density("csr", shape=(1,)) == 0.0  # two row pointers outweigh one value
    assert break_even_density("bitmask", shape=(10, 10), value_bits=1) == 0.0


@pytest.mark.parametrize(("shape", "bits"), [((300, 784), 5), ((64, 256), 3), ((50, 20, 5, 5), 8), ((4096,), 2)])
def test_relative_break_even_is_a_real_crossover(shape, bits):
    d = break_even_density("relative", shape=shape, relative_index_bits=bits)
    assert 0 < d < 1
    assert d <= 32 / (32 + bits)  # fillers only add to the v/(v+b) bound
    assert d == break_even_density("relative", shape=shape, relative_index_bits=bits, seed=0)
    # Other random patterns of the same shape cross over at about the same density.
    below = sparse_sizes(random_sparse(shape, d - 0.02, seed=7), relative_index_bits=bits)
    above = sparse_sizes(random_sparse(shape, min(d + 0.02, 1.0), seed=7), relative_index_bits=bits)
    assert below.relative < below.dense
    assert above.relative > above.dense


def test_relative_break_even_drops_with_fewer_index_bits():
    shape = (100, 100)
    ds = [break_even_density("relative", shape=shape, relative_index_bits=b) for b in (1, 2, 3, 5)]
    assert ds[0] < 0.01  # a 1-bit gap needs a filler for every zero between non-zeros
    assert ds[0] < ds[1]


def test_model_sparse_sizes_per_layer_and_total():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with torch.no_grad():
        model[3].weight[:, ::2] = 0  # prune half the Linear's columns
    sizes = model_sparse_sizes(model)
    assert set(sizes) == {"0", "3", "total"}
    assert sizes["3"] == sparse_sizes(model[3].weight)
    assert sizes["3"].nonzero == int(torch.count_nonzero(model[3].weight)) == 10 * 72
    assert sizes["0"].numel == 4 * 1 * 3 * 3
    for field in ("numel", "nonzero", "dense", "csr", "bitmask", "relative", "relative_entries"):
        assert getattr(sizes["total"], field) == getattr(sizes["0"], field) + getattr(sizes["3"], field)
    assert sizes["total"].density == pytest.approx((36 + 720) / (36 + 1440), abs=0.01)


def test_model_sparse_sizes_layers_and_kwargs():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 10))
    sizes = model_sparse_sizes(model, layers=(nn.Linear,), value_bits=8)
    assert set(sizes) == {"2", "total"}
    assert sizes["total"].dense == 1440
    assert isinstance(sizes["total"], SparseSizes)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(value_bits=0), "value_bits must be an integer from 1 to 64"),
        (dict(value_bits=65), "value_bits must be an integer from 1 to 64"),
        (dict(value_bits=8.0), "value_bits must be an integer"),
        (dict(index_bits=-3), "index_bits must be an integer from 1 to 64"),
        (dict(relative_index_bits=100), "relative_index_bits must be an integer from 1 to 64"),
    ],
)
def test_bad_bits_raise(kwargs, match):
    with pytest.raises(WorkbenchError, match=match):
        sparse_sizes(A, **kwargs)
    with pytest.raises(WorkbenchError, match=match):
        break_even_density("csr", shape=(4, 4), **kwargs)


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (torch.empty(0, 3), r"empty tensor \(shape \(0, 3\)\)"),
        (np.zeros((2, 0)), "empty tensor"),
        (np.array(["a", "b"]), "dtype <U1.*expected numbers"),
        (np.array([1, None], dtype=object), "dtype object"),
        ([1.0, 0.0], "of a list: expected a torch.Tensor or a numpy.ndarray"),
    ],
)
def test_bad_inputs_raise(weight, match):
    with pytest.raises(WorkbenchError, match=match):
        sparse_sizes(weight)


@pytest.mark.parametrize(
    ("fmt", "shape", "match"),
    [
        ("coo", (4, 4), "unknown sparse format 'coo': expected one of csr, bitmask, relative"),
        ("dense", (4, 4), "expected one of csr, bitmask, relative"),
        ("csr", (4, 0), "shape must be a tuple of positive integers"),
        ("relative", (2.5, 4), "shape must be a tuple of positive integers"),
    ],
)
def test_bad_break_even_arguments_raise(fmt, shape, match):
    with pytest.raises(WorkbenchError, match=match):
        break_even_density(fmt, shape=shape)


def test_model_without_prunable_layers_raises():
    with pytest.raises(WorkbenchError, match="found no layer with a weight of type Linear"):
        model_sparse_sizes(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)), layers=(nn.Linear,))


def test_new_names_are_public():
    assert {"SparseSizes", "relative_entries", "sparse_sizes", "model_sparse_sizes",
            "break_even_density"} <= set(sparse.__all__)
