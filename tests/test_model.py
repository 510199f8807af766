"""The model: the paper's parameter counts, shapes, hybridize/export equivalence, filter_list validation."""
import json
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from xception_mx import get_model, list_models
from xception_mx.model import MIN_INPUT_SIZE, Xception, count_parameters


def _init(net, seed=0):
    mx.random.seed(seed)
    net.initialize()
    return net


def test_registry_names():
    assert list_models() == ["xception", "xception_slim", "xception41", "xception65", "xception71"]
    with pytest.raises(ValueError, match="unknown model 'xceptio'"):
        get_model("xceptio")


@pytest.mark.parametrize("name", ["xception", "xception41"])
def test_pretrained_true_is_one_line_naming_the_converter(name):
    from xception_mx.errors import UserError

    with pytest.raises(UserError) as caught:
        get_model(name, pretrained=True)
    message = str(caught.value)
    assert "\n" not in message and "ships no pretrained weights" in message
    assert "xception-convert SRC OUT_PREFIX" in message and "train-xception --pretrained OUT_PREFIX" in message
    assert get_model(name, pretrained=False, num_classes=3) is not None  # gluoncv-style callers pass it


def test_full_variant_matches_paper_parameter_counts():
    # Paper Table 3 / Keras: 22,855,952 trainable, 22,910,480 with BN running statistics.
    net = _init(get_model("xception"))
    assert count_parameters(net) == (22_855_952, 22_910_480)
    assert net.features.conv1.weight.shape == (32, 3, 3, 3)


def test_slim_variant_parameter_count():
    net = _init(get_model("xception_slim"))
    assert count_parameters(net)[0] == 6_311_180


def test_structure_is_the_papers():
    net = get_model("xception")
    convs = [b for b in _walk(net) if isinstance(b, gluon.nn.Conv2D)]
    assert all(c.bias is None for c in convs), "no conv may have a bias"
    depthwise = [c for c in convs if c._kwargs["num_group"] > 1]
    # 2 + 2 + 2 (entry) + 8 x 3 (middle) + 2 (block 12) + 2 (exit) = 34 separable convs.
    assert len(depthwise) == 34
    assert all(c._kwargs["num_group"] == c.weight.shape[0] and c.weight.shape[1] == 1 for c in depthwise)
    assert net.features.conv1._kwargs["pad"] == (0, 0) and net.features.conv1._kwargs["stride"] == (2, 2)
    assert net.features.conv2._kwargs["pad"] == (0, 0) and net.features.conv2._kwargs["stride"] == (1, 1)
    # Block 1 starts with its separable conv (no ReLU); every other block starts with a ReLU.
    assert not isinstance(net.features.block1.rep[0], gluon.nn.Activation)
    for i in range(2, 13):
        assert isinstance(getattr(net.features, f"block{i}").rep[0], gluon.nn.Activation)
    # Strided blocks have a 1x1 stride-2 conv shortcut and end with a 3x3 stride-2 max pool; middle blocks don't.
    for i in (1, 2, 3, 12):
        block = getattr(net.features, f"block{i}")
        assert block.skip._kwargs["kernel"] == (1, 1) and block.skip._kwargs["stride"] == (2, 2)
        assert isinstance(block.rep[-1], gluon.nn.MaxPool2D)
    for i in range(4, 12):
        assert getattr(net.features, f"block{i}").skip is None
    # Block 12 widens at its last separable conv (728 -> 728 -> 1024).
    assert net.features.block12.rep[1].pointwise.weight.shape == (728, 728, 1, 1)
    assert net.features.block12.rep[4].pointwise.weight.shape == (1024, 728, 1, 1)
    assert net.dropout._rate == 0.5
    bn = net.features.bn1._kwargs
    assert bn["eps"] == 1e-3 and bn["momentum"] == 0.99


def test_names_map_onto_timm_legacy_xception():
    names = set(get_model("xception")._collect_params_with_prefix())
    for expected in ["features.conv1.weight", "features.bn1.gamma", "features.bn2.running_var",
                     "features.block1.skip.weight", "features.block1.skipbn.beta",
                     "features.block1.rep.0.conv1.weight", "features.block1.rep.0.pointwise.weight",
                     "features.block1.rep.1.gamma", "features.block1.rep.3.pointwise.weight",
                     "features.block4.rep.1.conv1.weight", "features.block4.rep.8.running_mean",
                     "features.block12.rep.4.pointwise.weight", "features.conv3.conv1.weight",
                     "features.conv4.pointwise.weight", "features.bn4.gamma", "fc.weight", "fc.bias"]:
        assert expected in names, expected


@pytest.mark.parametrize("size", [71, 224, 299, 331])
def test_output_shape(size):
    net = _init(get_model("xception_slim", num_classes=7))
    assert net(mx.nd.zeros((2, 3, size, size))).shape == (2, 7)


def test_too_small_input_is_a_value_error():
    net = _init(get_model("xception_slim"))
    with pytest.raises(ValueError, match=f"at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}.*70x70"):
        net(mx.nd.zeros((1, 3, 70, 70)))
    with pytest.raises(ValueError, match="71x70"):
        net(mx.nd.zeros((1, 3, 71, 70)))


def test_hybridized_equals_imperative(tiny_filters):
    net = _init(Xception(tiny_filters, num_classes=5))
    x = mx.nd.random.uniform(-1, 1, shape=(3, 3, 80, 80))
    imperative = net(x).asnumpy()
    net.hybridize(static_alloc=True, static_shape=True)
    hybrid = net(x).asnumpy()
    np.testing.assert_allclose(hybrid, imperative, rtol=1e-5, atol=1e-5)
    assert np.abs(imperative).max() > 0


def test_export_imports_without_our_package(tmp_path, tiny_filters):
    net = _init(Xception(tiny_filters, num_classes=4))
    # Move BN running statistics off their defaults so the export must carry them.
    with autograd.record():
        net(mx.nd.random.uniform(-1, 1, shape=(4, 3, 75, 75)))
    net.hybridize()
    x = mx.nd.random.uniform(-1, 1, shape=(2, 3, 75, 75))
    expected = net(x).asnumpy()
    prefix = str(tmp_path / "tiny")
    net.export(prefix, epoch=0)
    np.save(tmp_path / "x.npy", x.asnumpy())
    script = textwrap.dedent(f"""
        import json, sys
        import mxnet as mx, numpy as np
        net = mx.gluon.SymbolBlock.imports({prefix + '-symbol.json'!r}, ['data'], {prefix + '-0000.params'!r})
        out = net(mx.nd.array(np.load({str(tmp_path / 'x.npy')!r}))).asnumpy()
        print(json.dumps({{"out": out.tolist(), "xception_mx_loaded": "xception_mx" in sys.modules}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            check=True)
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["xception_mx_loaded"] is False
    np.testing.assert_allclose(np.array(payload["out"]), expected, rtol=1e-5, atol=1e-5)


def test_custom_filter_list_trains_one_step(tiny_filters):
    net = _init(Xception(tiny_filters, num_classes=3, dropout=0.0))
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    x = mx.nd.random.uniform(-1, 1, shape=(4, 3, 72, 72))
    y = mx.nd.array([0, 1, 2, 1])
    before = net.features.conv1.weight.data().copy()
    with autograd.record():
        loss = loss_fn(net(x), y)
    loss.backward()
    trainer.step(4)
    assert np.isfinite(loss.asnumpy()).all()
    assert not np.allclose(before.asnumpy(), net.features.conv1.weight.data().asnumpy())
    assert net.features.conv1.weight.shape == (tiny_filters[0] // 2, 3, 3, 3)
    assert net.fc.weight.shape == (3, tiny_filters[6])


@pytest.mark.parametrize("bad", [(64, 128, 256), (64, 128, 256, 728, 1024, 1536, 2048, 4096),
                                 (64, 0, 256, 728, 1024, 1536, 2048), (64, -8, 256, 728, 1024, 1536, 2048),
                                 (64, 128.0, 256, 728, 1024, 1536, 2048), (1, 8, 8, 8, 8, 8, 8)])
def test_malformed_filter_list_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="filter_list"):
        Xception(bad)


def test_reset_classifier_keeps_features(tiny_filters):
    net = _init(Xception(tiny_filters, num_classes=10))
    features_before = net.features.conv1.weight.data().asnumpy().copy()
    net.reset_classifier(5)
    assert net(mx.nd.zeros((1, 3, 71, 71))).shape == (1, 5)
    np.testing.assert_array_equal(net.features.conv1.weight.data().asnumpy(), features_before)
    assert "fc.weight" in net._collect_params_with_prefix()


def _walk(block):
    yield block
    for child in block._children.values():
        yield from _walk(child)
