"""Loading an export for inference (xception_mx.inference): padded at load with the paper's function, files
untouched; graphs it cannot pad load as they are; bfloat16 conversion keeps unblocked depthwise convolutions fp32."""
import json
import os

import mxnet as mx
import numpy as np
import pytest

from helpers import needs_cpu_flag
from xception_mx.inference import Speedups, load_exported, ready
from xception_mx.registry import get_model, list_models
from xception_mx.weights import named_params


def _export(tmp_path, name, **kwargs):
    """A registered model with random weights and BatchNorm statistics, exported at the paper's widths."""
    mx.random.seed(3)
    net = get_model(name, num_classes=10, **kwargs)
    net.initialize(mx.init.Xavier())
    for key, param in named_params(net).items():
        if key.endswith(("running_mean", "beta")):
            param.set_data(mx.nd.random.uniform(-0.3, 0.3, param.shape))
        elif key.endswith(("running_var", "gamma")):
            param.set_data(mx.nd.random.uniform(0.5, 1.5, param.shape))
    net.hybridize()
    x = mx.nd.random.uniform(-1, 1, (2, 3, 80, 80))
    expected = net(x).asnumpy()
    prefix = str(tmp_path / name)
    net.export(prefix, 0)
    return prefix, x, expected


@pytest.mark.parametrize("name", list_models())
def test_every_registered_export_loads_padded_with_the_same_logits_and_untouched_files(tmp_path, name):
    prefix, x, expected = _export(tmp_path, name)
    files = {p: os.path.getmtime(p) for p in (f"{prefix}-symbol.json", f"{prefix}-0000.params")}
    net = load_exported(prefix, 0, [mx.cpu()], channel_multiple=16)
    assert net.channel_multiple == 16
    symbol = net(mx.sym.var("data"))
    symbol.infer_shape(data=(2, 3, 80, 80))  # binding checks the variables' recorded shapes (INT8 binds)
    graph = json.loads(symbol.tojson())
    widths = [int(n["attrs"]["num_filter"]) for n in graph["nodes"] if n["op"] == "Convolution"]
    assert widths and all(w % 16 == 0 for w in widths), sorted(set(w for w in widths if w % 16))
    canonical = mx.nd.load(f"{prefix}-0000.params")  # every family has a width that is not a multiple of 16
    assert any(p.shape != canonical["arg:" + k].shape for k, p in net.collect_params().items()
               if "arg:" + k in canonical)
    np.testing.assert_allclose(net(x).asnumpy(), expected, rtol=0, atol=1e-5)
    assert files == {p: os.path.getmtime(p) for p in files}


def test_a_graph_it_cannot_pad_loads_as_it_is(tmp_path, caplog):
    """A concatenation of feature maps (not in our models) is not padded: one log line, the paper's widths."""
    data = mx.sym.var("data")
    a = mx.sym.Convolution(data, num_filter=12, kernel=(3, 3), pad=(1, 1), name="a")
    b = mx.sym.Convolution(data, num_filter=20, kernel=(1, 1), name="b")
    out = mx.sym.FullyConnected(mx.sym.Pooling(mx.sym.concat(a, b, dim=1), global_pool=True, kernel=(1, 1),
                                               pool_type="avg"), num_hidden=3, name="fc")
    block = mx.gluon.SymbolBlock(out, data)
    block.initialize(mx.init.Normal(0.1))
    x = mx.nd.random.uniform(-1, 1, (2, 3, 8, 8))
    expected = block(x).asnumpy()
    prefix = str(tmp_path / "concat")
    block.hybridize()
    block(x)
    block.export(prefix, 0)
    with caplog.at_level("INFO", logger="xception_mx.inference"):
        net = load_exported(prefix, 0, [mx.cpu()], channel_multiple=16)
    assert net.channel_multiple == 1 and "is not padded (operator Concat" in caplog.text
    np.testing.assert_allclose(net(x).asnumpy(), expected, rtol=0, atol=1e-6)


def test_auto_pads_on_cpu_only():
    assert Speedups(amp="bfloat16").multiple([mx.cpu()]) == Speedups().multiple([mx.cpu(), mx.cpu(1)]) == 16
    assert Speedups().multiple([mx.gpu(0)]) == 1
    assert Speedups(channel_multiple=8).multiple([mx.gpu(0)]) == 8


@needs_cpu_flag("avx512_bf16", "bfloat16 inference is refused without it")
@pytest.mark.parametrize("multiple", [1, 16])
def test_bfloat16_inference_is_close_to_fp32_and_keeps_only_unblocked_depthwise_fp32(tmp_path, multiple):
    prefix, x, expected = _export(tmp_path, "xception41")
    loaded = ready(prefix, 0, [mx.cpu()], (3, 80, 80), Speedups(amp="bfloat16", channel_multiple=multiple))
    assert (loaded.amp, loaded.channel_multiple, loaded.fused) == ("bfloat16", multiple, False)
    logits = loaded.net(x).asnumpy()
    assert logits.dtype == np.float32
    assert np.abs(logits - expected).max() <= 0.1 * np.abs(expected).max()  # bfloat16 keeps 8 bits of mantissa
    internals = loaded.net._cached_graph[1].get_internals()
    _, types, _ = internals.infer_type(data="float32")
    dtype = dict(zip(internals.list_outputs(), types))
    seen = set()
    for node in json.loads(internals.tojson())["nodes"]:
        if node["op"] == "Convolution":
            grouped = int(node["attrs"].get("num_group", "1")) > 1
            unblocked = int(node["attrs"]["num_filter"]) % 16 != 0
            runs = "float32" if np.dtype(dtype[node["name"] + "_output"]) == np.float32 else "bfloat16"
            seen.add((grouped, unblocked, runs))
            assert runs == ("float32" if grouped and unblocked else "bfloat16"), node["name"]
    assert ((True, True, "float32") in seen) == (multiple == 1)  # 728 at the paper's widths
