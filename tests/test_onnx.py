"""ONNX export: checker, dynamic batch, parity with PyTorch, and the quantization-friendly file."""

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from workbench import WorkbenchError, build, measure
from workbench import onnx as wonnx

SHAPES = {"mlp": (1, 8, 8), "lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "cnn": (1, 8, 8), "vit": (1, 8, 8)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for name, shape in SHAPES.items():
        model = build(name, input_shape=shape, num_classes=10, seed=1)
        if name == "cnn":  # give BN non-trivial statistics so eval-mode BN is really exercised
            model.train()
            with torch.no_grad():
                model(torch.randn(64, *shape) * 2 + 0.5)
            model.eval()
        path = wonnx.export(model, tmp_path_factory.mktemp(name) / f"{name}.onnx", input_shape=shape)
        out[name] = (model, path, shape)
    return out


@pytest.mark.parametrize("name", list(SHAPES))
def test_export_is_valid_and_matches_pytorch(exported, name):
    model, path, shape = exported[name]
    proto = onnx.load(str(path))
    assert len(proto.graph.value_info) == 0, "value_info must be dropped (it breaks ORT quantization)"
    assert not any(node.metadata_props for node in proto.graph.node), "tracer annotations inflate the size"
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value, "the batch axis must be dynamic"
    X = torch.randn(37, *shape, generator=torch.Generator().manual_seed(0))
    p = wonnx.parity(model, path, X)
    assert p.n == 37 and p.max_abs_err <= 1e-4 and p.top1_agreement == 1.0


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_dynamic_batch_sizes_run(exported, batch):
    model, path, shape = exported["cnn"]
    sess = wonnx.session(path)
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    out = sess.run(None, {"input": x})[0]
    assert out.shape == (batch, 10)
    np.testing.assert_allclose(out, model(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["lenet300", "vit"])
def test_exported_file_survives_ort_quantization(exported, tmp_path, name):
    # The pitfall in REFERENCE.md: the exporter's value_info made quantize_dynamic fail.
    model, path, shape = exported[name]
    q = tmp_path / "q.onnx"
    quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8)
    assert measure.file_bytes(q) < measure.file_bytes(path)
    out = wonnx.run_session(wonnx.session(q), torch.randn(4, *shape))
    assert out.shape == (4, 10) and np.isfinite(out).all()


def test_ort_latency_records_threads_and_batch(exported):
    _, path, shape = exported["mlp"]
    stats = wonnx.ort_latency(path, torch.randn(8, *shape), threads=1, warmup=2, repeats=10)
    assert stats.threads == 1 and stats.batch_size == 8 and stats.p50_us > 0


def test_legacy_fallback_when_new_exporter_fails(tmp_path, monkeypatch):
    real = torch.onnx.export

    def flaky(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated torch.export failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", flaky)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with pytest.warns(UserWarning, match="falling back to the legacy exporter"):
        path = wonnx.export(model, tmp_path / "m.onnx", input_shape=(1, 8, 8))
    assert wonnx.parity(model, path, torch.randn(5, 1, 8, 8)).max_abs_err < 1e-5


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(WorkbenchError, match="does not exist"):
        wonnx.session(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not a protobuf")
    with pytest.raises(WorkbenchError, match="not a valid ONNX model"):
        wonnx.check(junk)
    with pytest.raises(WorkbenchError, match="could not load"):
        wonnx.session(junk)
    with pytest.raises(WorkbenchError, match="optimization level"):
        wonnx.session(junk, optimization="max")
