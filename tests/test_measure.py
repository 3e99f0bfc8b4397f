"""Measurement: MACs against hand counts, sizes against real files, latency statistics."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from workbench import WorkbenchError, build, measure
from workbench.models import Attention


@pytest.mark.parametrize(
    ("module", "shape", "hand"),
    [
        (nn.Linear(784, 300), (784,), 784 * 300),
        (nn.Conv2d(1, 20, 5), (1, 28, 28), 20 * 24 * 24 * (1 * 5 * 5)),
        (nn.Conv2d(16, 32, 3, padding=1, groups=4), (16, 8, 8), 32 * 8 * 8 * (16 // 4 * 3 * 3)),
        (nn.Conv2d(3, 8, 3, stride=2), (3, 9, 9), 8 * 4 * 4 * (3 * 3 * 3)),
    ],
)
def test_macs_of_single_layers(module, shape, hand):
    assert measure.macs(module, shape).total == hand


def test_macs_of_attention_count_both_matmuls():
    n, dim, heads = 17, 64, 4
    hand = n * dim * 3 * dim + 2 * heads * n * n * (dim // heads) + n * dim * dim  # qkv, QK^T and AV, proj
    assert measure.macs(Attention(dim, heads), (n, dim)).total == hand


def test_macs_of_whole_models_and_per_module_breakdown():
    lenet5 = build("lenet5", input_shape=(1, 28, 28), num_classes=10)
    report = measure.macs(lenet5, (1, 28, 28))
    conv1, conv2 = 20 * 24 * 24 * 25, 50 * 8 * 8 * (20 * 25)
    assert report.total == conv1 + conv2 + 800 * 500 + 500 * 10
    assert report.per_module["LeNet5.features.0"] == conv1
    mlp = build("lenet300", input_shape=(1, 28, 28), num_classes=10)
    assert measure.macs(mlp, (1, 28, 28)).total == 784 * 300 + 300 * 100 + 100 * 10


def test_macs_on_a_wrong_input_shape_names_it_and_keeps_torchs_error():
    with pytest.raises(WorkbenchError, match=r"input of shape \(1, 10\) to count MACs: RuntimeError") as info:
        measure.macs(nn.Linear(784, 300), (10,))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_counts_and_sizes(tmp_path):
    model = build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(16,))
    n = 64 * 16 + 16 + 16 * 10 + 10
    assert measure.count_params(model) == n
    with torch.no_grad():
        model.net[1].weight[:, :32] = 0
    assert measure.count_nonzero(model) == n - 16 * 32
    assert measure.param_bytes(model) == 4 * n
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert measure.state_dict_bytes(model) == os.path.getsize(tmp_path / "model.pt")
    assert measure.file_bytes(tmp_path / "model.pt") == os.path.getsize(tmp_path / "model.pt")
    with pytest.raises(WorkbenchError, match="no such file"):
        measure.file_bytes(tmp_path / "nope.onnx")


def test_latency_statistics_are_consistent_and_threads_recorded():
    seen = []
    model = nn.Linear(64, 10)

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return model(x)

    before = torch.get_num_threads()
    stats = measure.torch_latency(Spy(), torch.randn(8, 64), threads=1, warmup=3, repeats=20)
    assert set(seen) == {1} and len(seen) == 23
    assert torch.get_num_threads() == before
    assert stats.min_us <= stats.p50_us <= stats.p90_us <= stats.p99_us <= stats.max_us
    assert (stats.threads, stats.batch_size, stats.repeats, stats.warmup) == (1, 8, 20, 3)
    assert stats.per_example_us == pytest.approx(stats.p50_us / 8)


def test_latency_percentiles_follow_the_samples(monkeypatch):
    fake = np.arange(1, 101, dtype=float)  # 1..100 us
    monkeypatch.setattr(measure, "time_calls", lambda fn, warmup, repeats: fake)
    stats = measure.latency(lambda: None, repeats=100)
    assert stats.p50_us == pytest.approx(np.percentile(fake, 50))
    assert stats.p99_us == pytest.approx(np.percentile(fake, 99)) and stats.max_us == 100


def test_bad_latency_arguments():
    with pytest.raises(WorkbenchError):
        measure.time_calls(lambda: None, repeats=0)
    with pytest.raises(WorkbenchError, match="threads"):
        measure.torch_latency(nn.Linear(2, 2), torch.randn(1, 2), threads=0)


def test_side_by_side_interleaves_and_pools_samples():
    order = []
    stats = measure.side_by_side({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                 rounds=3, repeats=4, warmup=2, batch_size=8)
    assert order[:4] == ["a", "a", "b", "b"]  # warm-up, then rounds of a x4, b x4, ...
    assert order[4:] == (["a"] * 4 + ["b"] * 4) * 3
    assert stats["a"].repeats == 12 and stats["b"].batch_size == 8
    with pytest.raises(WorkbenchError):
        measure.side_by_side({})
