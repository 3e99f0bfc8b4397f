"""Deep Compression's weight sharing: 1-D k-means vs scikit-learn, codebooks, centroid gradients, fine-tuning."""

import copy

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn

from workbench import WorkbenchError, build, cluster, evaluate, fit, load, prune


def pruned_lenet300(amount=0.92, seed=0):
    model = build("lenet300", input_shape=(1, 28, 28), num_classes=10, seed=seed)
    prune.apply_masks(model, prune.magnitude_masks(model, amount, scope="layer"))
    return prune.finalize(model)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The models here are tiny: a second intra-op thread only adds synchronization, and on a busy
    # 2-core machine OpenMP's waiting threads made these tests 5-10x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def shared():
    model = pruned_lenet300()
    return model, cluster.share_weights(model, bits=5)


# --- k-means --------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", cluster.INITS)
@pytest.mark.parametrize("k", [2, 8, 32])
def test_kmeans_matches_sklearn_from_the_same_init(k, init):
    x = np.random.default_rng(k).normal(size=2000)
    start = cluster.init_centroids(x, k, init=init, seed=1)
    c, labels = cluster.kmeans_1d(x, k, init=init, seed=1)
    ref = KMeans(k, init=start.reshape(-1, 1), n_init=1, max_iter=cluster.LLOYD_ITERS, tol=0.0,
                 algorithm="lloyd").fit(x.reshape(-1, 1))
    order = np.argsort(ref.cluster_centers_.ravel())
    np.testing.assert_allclose(c, ref.cluster_centers_.ravel()[order], atol=1e-5)
    np.testing.assert_array_equal(labels, np.argsort(order)[ref.labels_])
    assert ((x - c[labels]) ** 2).sum() == pytest.approx(ref.inertia_, rel=1e-9)


def test_kmeans_fills_the_gap_that_pruning_leaves():
    # Pruned weights are bimodal: linear init puts centroids in the empty gap around zero. Empty
    # clusters are moved onto far points, so every cluster ends up used, at a Lloyd fixed point.
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.05, size=20000)
    x = w[np.abs(w) > 0.08]
    c, labels = cluster.kmeans_1d(x, 16)
    assert np.all(np.bincount(labels, minlength=16) > 0)
    np.testing.assert_allclose(c, np.bincount(labels, weights=x) / np.bincount(labels), rtol=1e-12)
    assert np.array_equal(labels, np.abs(x[:, None] - c[None]).argmin(1))


# --- weight sharing -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 5])
@pytest.mark.parametrize("init", cluster.INITS)
def test_shared_layers_take_exactly_k_values_and_keep_their_zeros(bits, init):
    model = pruned_lenet300(0.9)
    zeros = {n: m.weight == 0 for n, m in prune.prunable_layers(model).items()}
    books = cluster.share_weights(model, bits=bits, init=init)
    for name, layer in prune.prunable_layers(model).items():
        w, book = layer.weight.detach(), books[name]
        assert torch.equal(w == 0, zeros[name]), name
        assert torch.equal(book.indices < 0, zeros[name]), name
        assert len(torch.unique(w[w != 0])) == 2 ** bits == len(book.centroids)
        assert book.centroids.dtype == torch.float32 and book.indices.dtype == torch.int64
        assert torch.equal(w, book.weight())


def test_per_layer_bits_as_in_the_paper():
    model = build("lenet5", input_shape=(1, 28, 28), num_classes=10)
    prune.apply_masks(model, prune.magnitude_masks(model, {"classifier.1": 0.9}))
    bits = cluster.layer_bits(model, conv=8, fc=5)
    assert bits == {"features.0": 8, "features.2": 8, "classifier.1": 5, "classifier.3": 5}
    books = cluster.share_weights(prune.finalize(model), bits={**bits, "classifier.3": 3})
    assert {n: len(b.centroids) for n, b in books.items()} == {
        "features.0": 256, "features.2": 256, "classifier.1": 32, "classifier.3": 8}


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, True, "5"])
def test_bits_outside_1_to_16_are_refused(bits):
    with pytest.raises(WorkbenchError, match="1 to 16"):
        cluster.share_weights(pruned_lenet300(), bits=bits)


def test_bad_bits_maps_and_too_many_clusters_are_refused():
    model = pruned_lenet300()
    with pytest.raises(WorkbenchError, match="unknown: fc9"):
        cluster.share_weights(model, bits={"net.1": 5, "net.3": 5, "net.5": 5, "fc9": 5})
    with pytest.raises(WorkbenchError, match="missing: net.5"):
        cluster.share_weights(model, bits={"net.1": 5, "net.3": 5})
    tiny = nn.Sequential(nn.Linear(3, 2))  # 6 weights, 8 clusters
    with pytest.raises(WorkbenchError, match="6 non-zero weights, fewer than the 8 clusters.*at most 2 bits"):
        cluster.share_weights(tiny, bits=3)
    with pytest.raises(WorkbenchError, match="unknown k-means init"):
        cluster.share_weights(model, bits=2, init="kmeans++")
    with pytest.raises(WorkbenchError, match="needs at least 9 values"):
        cluster.kmeans_1d(np.arange(8.0), 9)


# --- trained quantization -------------------------------------------------------------------------


def test_centroid_gradient_is_the_sum_of_member_gradients_by_hand():
    layer = nn.Linear(3, 2, bias=False)
    book = cluster.Codebook(centroids=torch.tensor([-1.0, 0.5]),
                            indices=torch.tensor([[0, 1, -1], [1, 1, 0]]), bits=1)
    with torch.no_grad():
        layer.weight.copy_(book.weight())
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    model = nn.Sequential(layer)
    with cluster.tied(model, {"0": book}) as centroids:
        (model[0].weight * g).sum().backward()   # dL/dW = g
        # cluster 0: g[0,0] + g[1,2] = 1 + 6; cluster 1: g[0,1] + g[1,0] + g[1,1] = 2 + 4 + 5; g[0,2] is pruned
        assert centroids["0"].grad.tolist() == [7.0, 11.0]
    assert cluster.centroid_grad(g, book).tolist() == [7.0, 11.0]
    assert torch.equal(model[0].weight, torch.tensor([[-1.0, 0.5, 0.0], [0.5, 0.5, -1.0]]))
    assert not any(n.startswith("parametrizations") for n, _ in model.named_parameters())


def test_tied_autograd_equals_the_explicit_sum_on_a_real_batch(shared, digits):
    model, books = shared
    model, books = copy.deepcopy(model), copy.deepcopy(books)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 10
    nn.functional.cross_entropy(model(x), y).backward()
    expected = {n: cluster.centroid_grad(m.weight.grad, books[n]) for n, m in prune.prunable_layers(model).items()}
    model.zero_grad()
    with cluster.tied(model, books) as centroids:
        nn.functional.cross_entropy(model(x), y).backward()
        for name, c in centroids.items():
            torch.testing.assert_close(c.grad, expected[name], rtol=1e-5, atol=1e-7)


def test_finetuning_keeps_weights_tied_is_deterministic_and_keeps_accuracy(digits):
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=(32,))
    fit(model, digits, epochs=8, lr=1e-2, batch_size=128, progress=False)
    prune.apply_masks(model, prune.magnitude_masks(model, 0.6, scope="global"))
    prune.finalize(model)
    before = evaluate(model, digits.X_test, digits.y_test).accuracy
    zeros = {n: m.weight == 0 for n, m in prune.prunable_layers(model).items()}
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        books = cluster.share_weights(m, bits=2)
        start = {n: b.centroids.clone() for n, b in books.items()}
        hist = cluster.finetune_centroids(m, books, digits, epochs=2, lr=1e-3, batch_size=128, progress=False)
        assert hist.epochs == 2
        for name, layer in prune.prunable_layers(m).items():
            assert torch.equal(layer.weight.detach(), books[name].weight()), name
            assert torch.equal(layer.weight == 0, zeros[name]), name
            assert not torch.equal(books[name].centroids, start[name]), name
        runs.append((m, books))
    (m1, b1), (m2, b2) = runs
    assert all(torch.equal(b1[n].centroids, b2[n].centroids) for n in b1)
    after = evaluate(m1, digits.X_test, digits.y_test).accuracy
    assert after >= before - 0.05, (before, after)   # 2-bit weights, fine-tuned: no collapse
    assert cluster.finetune_centroids(m1, b1, digits, epochs=0) is None
