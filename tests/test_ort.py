"""ONNX Runtime deployment: providers (and fallback), threads, optimization levels, int8 modes, diagnostics, bad input."""

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest

from workbench import WorkbenchError, build, fit, load, ort
from workbench import onnx as wonnx


@pytest.fixture(scope="module")
def data():
    return load("digits", seed=0)


def _trained(name, data, tmp_path_factory, **options):
    model = build(name, input_shape=data.input_shape, num_classes=data.num_classes, seed=0, **options)
    fit(model, data, epochs=3, lr=2e-3, progress=False)
    path = wonnx.export(model, tmp_path_factory.mktemp(name) / f"{name}.onnx", input_shape=data.input_shape)
    return model, path


@pytest.fixture(scope="module")
def mlp(data, tmp_path_factory):
    return _trained("mlp", data, tmp_path_factory, hidden=(256, 256))


@pytest.fixture(scope="module")
def cnn(data, tmp_path_factory):
    return _trained("cnn", data, tmp_path_factory)


def _outputs(path, X, **kw):
    return wonnx.run_session(wonnx.session(path, **kw), X)


# -- providers, threads, optimization levels ------------------------------------------------


def test_provider_resolution():
    assert wonnx.resolve_providers(None) == ["CPUExecutionProvider"]
    auto = wonnx.resolve_providers("auto")
    assert auto[-1] == "CPUExecutionProvider" and "AzureExecutionProvider" not in auto
    assert set(auto) <= set(onnxruntime.get_available_providers())
    assert wonnx.resolve_providers(["cpu"]) == wonnx.resolve_providers("CPUExecutionProvider") == auto[-1:]


@pytest.mark.parametrize("name", ["tensorrt", "CUDAExecutionProvider", "openvino", "coreml"])
def test_provider_not_installed_lists_the_available_ones(mlp, name):
    if wonnx.PROVIDERS.get(name, name) in onnxruntime.get_available_providers():
        pytest.skip(f"{name} is installed here")
    with pytest.raises(WorkbenchError, match=r"is not installed in this onnxruntime .*; available: .*CPUExecutionProvider"):
        wonnx.session(mlp[1], providers=[name, "cpu"])


def test_unknown_provider_name_lists_short_names(mlp):
    with pytest.raises(WorkbenchError, match=r"'gpu' is not installed .*short names: tensorrt, cuda"):
        wonnx.resolve_providers("gpu")


def test_fallback_is_said_out_loud(mlp, monkeypatch):
    # Pretend CUDA is installed: ORT then cannot start it and runs on CPU; the session must say so.
    real = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sess = wonnx.session(mlp[1], providers="cuda")
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert any("could not start CUDAExecutionProvider and fell back to CPUExecutionProvider" in str(w.message)
               for w in caught)


def test_provider_report_names_every_node(mlp, data):
    rep = wonnx.provider_report(mlp[1], data.X_test[:1], providers="cpu")
    optimized = {n.name for n in wonnx.optimized_graph(mlp[1]).graph.node}
    assert set(rep.nodes) == optimized and rep.counts() == {"CPUExecutionProvider": len(optimized)}
    assert not rep.fell_back and rep.session_providers == ["CPUExecutionProvider"]


def test_threads_and_levels_give_the_same_outputs(cnn, data):
    X = data.X_test[:64]
    ref = _outputs(cnn[1], X, optimization="disabled")
    for level in wonnx.OPT_LEVELS:
        for threads in (1, 2):
            assert np.abs(_outputs(cnn[1], X, optimization=level, threads=threads) - ref).max() <= 1e-4


def test_optimization_levels_fuse_nodes(cnn, data):
    rows = wonnx.optimization_levels(cnn[1], data.X_test[:8], rounds=1, repeats=5)
    assert [r["level"] for r in rows] == ["disabled", "basic", "extended", "all"]
    original = len(onnx.load(str(cnn[1])).graph.node)
    assert rows[0]["nodes"] == original and rows[0]["speedup"] == 1.0
    assert rows[-1]["nodes"] < original  # Conv+ReLU and Gemm+ReLU fused
    assert rows[-1]["ops"].get("Relu", 0) < rows[0]["ops"]["Relu"]
    # torch's exporter already folded the BN layers into the convolutions (constant folding).
    assert all("BatchNormalization" not in r["ops"] for r in rows)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(threads=0), "threads must be an integer >= 1"),
    (dict(optimization="max"), "unknown optimization level 'max'; known: disabled, basic, extended, all"),
])
def test_bad_session_settings(mlp, kw, match):
    with pytest.raises(WorkbenchError, match=match):
        wonnx.session(mlp[1], **kw)


@pytest.mark.parametrize("content", [b"definitely not a model", b"", b"\x08\x07"])
def test_a_file_that_is_not_onnx(tmp_path, content, data):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(content)
    for call in (lambda: wonnx.session(bad), lambda: ort.quantize(bad, tmp_path / "q.onnx", mode="dynamic"),
                 lambda: ort.op_profile(bad, data.X_test[:1])):
        with pytest.raises(WorkbenchError, match="is not an ONNX model"):
            call()


# -- quantization ---------------------------------------------------------------------------


def _agreement(a, b):
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def test_dynamic_quantization_of_the_mlp(mlp, data, tmp_path):
    q = ort.quantize(mlp[1], tmp_path / "dyn.onnx", mode="dynamic")
    assert q.mode == "dynamic" and not q.per_channel and q.speedup is None
    assert "MatMulInteger" in q.ops and "DynamicQuantizeLinear" in q.ops
    assert q.size_ratio >= 3.5
    X = data.X_test
    assert _agreement(_outputs(q.path, X), _outputs(mlp[1], X)) >= 0.97


def test_static_qdq_per_channel_of_the_cnn(cnn, data, tmp_path):
    q = ort.quantize(cnn[1], tmp_path / "static.onnx", mode="static", calibration=data.X_train)
    assert q.mode == "static" and q.per_channel
    assert q.ops["QuantizeLinear"] >= 4 and q.ops["DequantizeLinear"] >= 4
    proto = onnx.load(q.path)
    inits = {i.name: i for i in proto.graph.initializer}
    conv_w = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
              and len(inits[n.input[0]].dims) == 4]
    assert conv_w and all(inits[n.input[1]].dims == [inits[n.input[0]].dims[0]] for n in conv_w)  # per channel
    X = data.X_test
    assert _agreement(_outputs(q.path, X), _outputs(cnn[1], X)) >= 0.97


def test_short_reduction_convs_counts_each_dot_product(tmp_path):
    from torch import nn

    # (in channels / groups) x kernel: 1x3x3 = 9, 3x5x5 = 75, depthwise 1x3x3 = 9, 8x3x3 = 72
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 8, 5, padding=2),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 3, padding=1),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    proto = onnx.load(str(wonnx.export(net, tmp_path / "convs.onnx", input_shape=(1, 8, 8))))
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    assert ort.short_reduction_convs(proto) == {convs[0]: 9, convs[2]: 9}
    assert ort.short_reduction_convs(proto, min_terms=73) == {convs[0]: 9, convs[2]: 9, convs[3]: 72}


def _first_maxpool_input_producer(path, tmp_path, **session_kw):
    optimized = tmp_path / "optimized.onnx"
    wonnx.session(path, optimized_path=optimized, optimization="extended", **session_kw)
    graph = onnx.load(str(optimized)).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    pool = next(n for n in graph.node if "MaxPool" in n.op_type)
    return producer.get(pool.input[0])


def test_static_keeps_the_stem_conv_in_float_and_sessions_keep_the_pool_in_float(cnn, data, tmp_path):
    fp32_convs = [n.name for n in onnx.load(str(cnn[1])).graph.node if n.op_type == "Conv"]
    q = ort.quantize(cnn[1], tmp_path / "keep.onnx", mode="static", calibration=data.X_train)
    assert q.kept_float == (fp32_convs[0],) and "kept in float" in q.reason
    proto = onnx.load(q.path)
    stem = next(n for n in proto.graph.node if n.name == fp32_convs[0])
    assert stem.op_type == "Conv" and stem.input[0] == "input"  # fed the float input directly, no DequantizeLinear
    assert wonnx.disabled_optimizers(q.path) == ["QDQPropagationTransformer"]
    # ORT's propagation would lift the QuantizeLinear above the first MaxPool (a slow uint8 NCHW
    # kernel); the session the workbench opens reads the model's metadata and leaves it out.
    assert _first_maxpool_input_producer(q.path, tmp_path) != "QuantizeLinear"
    assert _first_maxpool_input_producer(q.path, tmp_path, disabled=[]) == "QuantizeLinear"
    X = data.X_test
    assert _agreement(_outputs(q.path, X), _outputs(cnn[1], X)) >= 0.97

    everything = ort.quantize(cnn[1], tmp_path / "all.onnx", mode="static", calibration=data.X_train, keep_float=None)
    assert everything.kept_float == () and wonnx.disabled_optimizers(everything.path) == []
    graph = onnx.load(everything.path).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    assert all(producer.get(n.input[0]) == "DequantizeLinear" for n in graph.node if n.op_type == "Conv")
    dynamic = ort.quantize(cnn[1], tmp_path / "dyn.onnx", mode="dynamic")
    assert dynamic.kept_float == () and dynamic.ops.get("ConvInteger") == 2  # "auto" keeps nothing for dynamic
    named = ort.quantize(cnn[1], tmp_path / "named.onnx", mode="dynamic", keep_float=fp32_convs)
    assert named.kept_float == tuple(fp32_convs) and "ConvInteger" not in named.ops


@pytest.mark.parametrize(("keep_float", "match"), [
    ("all", "keep_float must be 'auto', None or a list of node names, got 'all'"),
    (["conv_one"], r"keep_float names node\(s\) 'conv_one' that the model does not have; its nodes are: "),
])
def test_bad_keep_float_is_named(cnn, data, tmp_path, keep_float, match):
    with pytest.raises(WorkbenchError, match=match):
        ort.quantize(cnn[1], tmp_path / "q.onnx", mode="static", calibration=data.X_train[:64], keep_float=keep_float)


def test_auto_picks_per_family(mlp, cnn, data, tmp_path):
    assert ort.family(mlp[1]) == "linear" and ort.family(cnn[1]) == "conv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # speed on a loaded machine is not what this test checks
        qm = ort.quantize(mlp[1], tmp_path / "m.onnx", mode="auto", batch=8)
        qc = ort.quantize(cnn[1], tmp_path / "c.onnx", mode="auto", calibration=data.X_train[:128], batch=8)
    assert (qm.mode, qc.mode) == ("dynamic", "static")
    assert qm.speedup > 0 and qc.speedup > 0 and "auto" in qm.reason
    with pytest.raises(WorkbenchError, match="auto chose static .* needs calibration data"):
        ort.quantize(cnn[1], tmp_path / "c2.onnx", mode="auto")


def test_slower_int8_is_warned(cnn, data, tmp_path):
    # Dynamic quantization runs convolutions as ConvInteger: several times slower than fp32 here.
    with pytest.warns(UserWarning, match="SLOWER than fp32.*ConvInteger.*mode='static'"):
        q = ort.quantize(cnn[1], tmp_path / "dyn.onnx", mode="dynamic", check_speed=True, batch=32)
    assert q.speedup < 1 and "ConvInteger" in q.ops


def test_readers_and_batches_are_accepted(cnn, data, tmp_path):
    reader = ort.calibration_reader(cnn[1], data.X_train, batch_size=50, limit=100)
    assert [len(b["input"]) for b in reader] == [50, 50]
    batches = [{"input": data.X_train[i:i + 32].numpy()} for i in range(0, 64, 32)]
    for calibration in (reader, batches):
        assert ort.quantize(cnn[1], tmp_path / "s.onnx", mode="static", calibration=calibration).mode == "static"


@pytest.mark.parametrize(("calibration", "match"), [
    (lambda d: ort.ArrayReader(d.X_train, input_name="x"), r"feeds input\(s\) 'x' but the model's input\(s\) are 'input'"),
    (lambda d: [{"input": d.X_train[:8].reshape(8, -1).numpy()}], r"has shape \(8, 64\) but the model expects \(batch, 1, 8, 8\)"),
    (lambda d: [{"input": np.zeros((4, 1, 28, 28), np.float32)}], r"has shape \(4, 1, 28, 28\) but the model expects"),
    (lambda d: [], "gave no batches"),
    (lambda d: [d.X_train[:8]], "each batch must be a dict"),
])
def test_bad_calibration_is_named(cnn, data, tmp_path, calibration, match):
    with pytest.raises(WorkbenchError, match=match):
        ort.quantize(cnn[1], tmp_path / "s.onnx", mode="static", calibration=calibration(data))


@pytest.mark.parametrize(("kw", "match"), [
    (dict(mode="int4"), "unknown ORT quantization mode 'int4'; known: dynamic, static, auto"),
    (dict(mode="static"), "static quantization needs calibration data"),
    (dict(mode="dynamic", calibrate_method="kl"), "unknown calibration method 'kl'"),
])
def test_bad_quantize_settings(cnn, tmp_path, kw, match):
    with pytest.raises(WorkbenchError, match=match):
        ort.quantize(cnn[1], tmp_path / "q.onnx", **kw)


# -- diagnostics ------------------------------------------------------------------------------


def test_op_profile_of_static_qdq(cnn, data, tmp_path):
    q = ort.quantize(cnn[1], tmp_path / "s.onnx", mode="static", calibration=data.X_train[:128])
    unfused = ort.op_profile(q.path, data.X_test[:16], runs=3, optimization="disabled")
    table = unfused.by_op()
    assert sum(r["share"] for r in table) == pytest.approx(1.0)
    assert [r["us"] for r in table] == sorted((r["us"] for r in table), reverse=True)
    assert 0 < unfused.qdq_share < 1
    assert {r["op"] for r in table} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    fused = ort.op_profile(q.path, data.X_test[:16], runs=3)
    assert "QLinearConv" in {r["op"] for r in fused.by_op()}  # the QDQ pairs became integer kernels
    assert fused.qdq_share < unfused.qdq_share
    assert list(fused.table().columns) == ["nodes", "us", "share"]


def test_cpu_report_matches_the_flags():
    from workbench import bench

    flags = ort.cpu_flags()
    assert bench.machine_info()["cpu_flags"] == flags  # the bench records what the chapter reports
    rows = ort.cpu_report()
    assert [r["flag"] for r in rows] == ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    assert all(r["present"] == flags.get(r["flag"]) for r in rows if flags)
    assert all(r["what it means for int8"] for r in rows)


def test_recipe_ort_quant_describes_the_int8_model(tmp_path):
    from workbench import Recipe, run

    base = Recipe(model="cnn", dataset="digits", epochs=2, latency_repeats=5, model_options={"channels": [8, 16]})
    fp32 = run(base, cache=tmp_path, progress=False)
    res = run(base.replace(ort_quant="static"), cache=tmp_path, progress=False)
    info = res.steps["ort_quant"]
    assert info.mode == "static" and info.torch_accuracy == pytest.approx(fp32.accuracy)
    assert res.size_onnx_bytes == info.int8_onnx_bytes < fp32.size_onnx_bytes / 2  # tiny: graph overhead
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(res.onnx_path).graph.node}
    assert abs(res.accuracy - fp32.accuracy) <= 0.02 and res.onnx_top1_agreement >= 0.97
    assert run(base.replace(ort_quant="static"), cache=tmp_path).cached
    with pytest.raises(WorkbenchError, match="Recipe.ort_quant must be one of none, dynamic, static, auto"):
        base.replace(ort_quant="int8")
    with pytest.raises(WorkbenchError, match="set export_onnx=True"):
        base.replace(ort_quant="dynamic", export_onnx=False)
