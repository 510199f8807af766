"""Weight conversion (issue 7): logit parity with timm and Keras, bad weight files, .pth/Cadene reading, Keras pools.

The references (torch + timm, Keras 3 on the torch backend) cannot live in this venv (torch>=2 breaks gluoncv): they
run as subprocesses with the reference venv's python (``scripts/setup_ref_venv.sh``, which ``make test`` runs),
build the real networks with random weights, save them in their own formats and the logits of fixed inputs; the
test converts the files here and compares. No reference venv is a failure, not a skip.
"""
import json
import os
import sys
import warnings

import h5py
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from safetensors.numpy import load_file, save_file

import helpers
from helpers import SIZES, TOLERANCE, ref_run, write_inputs
from xception_mx.convert import build_pretrained, load_pretrained, main
from xception_mx.model import KerasSameMaxPool2D, Xception
from xception_mx.weight_formats import read_timm, timm_to_params


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Reference weight files and logits from timm and Keras (random weights, shared inputs in [-1, 1])."""
    folder = tmp_path_factory.mktemp("reference")
    inputs = write_inputs(folder, seed=42)
    summary = {"timm": json.loads(ref_run("ref_timm.py", str(folder), *inputs)),
               "keras": json.loads(ref_run("ref_keras.py", str(folder), *inputs))}
    return folder, summary


def _max_diff(net, folder, name: str, framework: str) -> float:
    x = mx.nd.array(np.load(folder / f"{name}.npy"))
    assert not autograd.is_training()
    ours = net(x).asnumpy()
    theirs = np.load(folder / f"{name}.{framework}.npy")
    assert ours.shape == theirs.shape == (2, 1000)
    assert np.abs(theirs).max() > 0.5 and theirs.std() > 0.1, "reference logits too small to mean anything"
    return float(np.abs(ours - theirs).max())


@pytest.mark.parity
@pytest.mark.parametrize("framework,src", [("timm", "timm.safetensors"), ("keras", "keras.h5")])
def test_parity_with_reference_implementation(reference, tmp_path, framework, src, capsys):
    folder, _ = reference
    prefix = str(tmp_path / framework)
    assert main([str(folder / src), prefix]) == 0
    params, meta = load_pretrained(prefix)
    assert meta["model"] == {"filter_list": [64, 128, 256, 728, 1024, 1536, 2048], "num_classes": 1000,
                             "bn_epsilon": 1e-5 if framework == "timm" else 1e-3,
                             "pool_padding": "symmetric" if framework == "timm" else "keras"}
    assert meta["preprocess"]["mean"] == meta["preprocess"]["std"] == [127.5] * 3
    assert len(params) == 236 and params["features.conv1.weight"].shape == (32, 3, 3, 3)
    net = build_pretrained(prefix, dropout=0.5)  # dropout configured but inactive outside training
    net.hybridize(static_alloc=True, static_shape=True)
    diffs = {name: _max_diff(net, folder, name, framework) for name in SIZES}
    # The MXNet export (what score.py loads) computes the same function.
    with warnings.catch_warnings():  # MXNet cannot infer the input type before the first call
        warnings.simplefilter("ignore")
        exported = mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")
    diffs["x299 export"] = _max_diff(exported, folder, "x299", framework)
    with capsys.disabled():
        print(f"\n{framework} parity, max |logit diff|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs
    if framework == "keras":  # the Keras pools matter: symmetric padding gives another function
        symmetric = build_pretrained(prefix, pool_padding="symmetric")
        assert _max_diff(symmetric, folder, "x299", "keras") > 1e-2


@pytest.mark.parity
def test_pth_and_cadene_files_read_like_safetensors(reference, tmp_path):
    """The .pth reader (needs torch: run in the reference venv) gives exactly the safetensors arrays, Cadene too."""
    folder, _ = reference
    expected = timm_to_params(read_timm(str(folder / "timm.safetensors"))).arrays
    for name in ("timm.pth", "cadene.pth"):
        out = tmp_path / f"{name}.npz"
        assert int(ref_run("read_with_converter.py", str(folder / name), str(out))) == 236
        got = dict(np.load(out))
        assert sorted(got) == sorted(expected), name
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")


def test_round_trip_and_load_pretrained(tiny_timm, tmp_path, tiny_filters):
    path, net = tiny_timm
    prefix = str(tmp_path / "out" / "tiny")
    assert main([path, prefix]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["tiny-0000.params", "tiny-preprocess.json", "tiny-symbol.json",
                                                    "tiny.json", "tiny.params"]
    for arg in (prefix, prefix + ".params", prefix + ".json"):
        params, meta = load_pretrained(arg)
        assert meta["model"]["filter_list"] == list(tiny_filters) and meta["model"]["num_classes"] == 6
        assert meta["source"]["framework"] == "timm" and meta["preprocess"]["interpolation"] == "bicubic"
    for name, param in net._collect_params_with_prefix().items():
        np.testing.assert_array_equal(params[name].asnumpy(), param.data().asnumpy(), err_msg=name)
    x = mx.nd.random.uniform(-1, 1, (2, 3, 80, 80))
    np.testing.assert_array_equal(build_pretrained(prefix)(x).asnumpy(), net(x).asnumpy())
    # The native file is Gluon's save_parameters format.
    fresh = Xception(tiny_filters, num_classes=6, bn_epsilon=1e-5)
    fresh.load_parameters(prefix + ".params")
    np.testing.assert_array_equal(fresh(x).asnumpy(), net(x).asnumpy())
    # A new head for fine-tuning: features loaded, fc left for the caller to initialise.
    head = build_pretrained(prefix, num_classes=3)
    head.fc.initialize()
    np.testing.assert_array_equal(head.features(x).asnumpy(), net.features(x).asnumpy())


def test_cadene_layout_safetensors(tiny_timm, tmp_path):
    """2-D pointwise weights, ``last_linear`` and no ``num_batches_tracked`` (old Cadene files) convert the same."""
    path, net = tiny_timm
    state = {}
    for key, value in load_file(path).items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("pointwise.weight"):
            value = np.ascontiguousarray(value[:, :, 0, 0])
        state[key.replace("fc.", "last_linear.") if key.startswith("fc.") else key] = value
    assert any(v.ndim == 2 and "pointwise" in k for k, v in state.items())
    cadene = str(tmp_path / "cadene.safetensors")
    save_file(state, cadene)
    prefix = str(tmp_path / "cadene")
    assert main([cadene, prefix]) == 0
    x = mx.nd.random.uniform(-1, 1, (1, 3, 75, 75))
    np.testing.assert_array_equal(build_pretrained(prefix)(x).asnumpy(), net(x).asnumpy())


def _assert_one_line_failure(capsys, argv, *needles):
    out_dir = os.path.dirname(argv[1])
    before = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m xception_mx.convert: error: "), err
    for needle in needles:
        assert needle in err, err
    after = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    assert after == before, "nothing may be written"
    return err


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_bad_timm_file_names_the_tensor_and_writes_nothing(tiny_timm, tmp_path, capsys, case):
    path, _ = tiny_timm
    state = load_file(path)
    if case == "missing":
        del state["block4.rep.5.running_var"]
        needle = "features.block4.rep.5.running_var"
    elif case == "extra":
        state["block4.rep.9.weight"] = np.ones(3, np.float32)
        needle = "block4.rep.9.weight"
    else:
        w = state["block2.rep.1.pointwise.weight"]
        state["block2.rep.1.pointwise.weight"] = np.ascontiguousarray(w[:, :-1])
        needle = "block2.rep.1.pointwise.weight"
    bad = str(tmp_path / "bad.safetensors")
    save_file(state, bad)
    err = _assert_one_line_failure(capsys, [bad, str(tmp_path / "out" / "bad")], needle, "nothing written")
    assert {"missing": "missing 1", "extra": "left over", "shape": "has shape"}[case] in err


def _weight_names(group) -> list:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["weight_names"]]


@pytest.mark.parity
@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_bad_keras_file_names_the_tensor_and_writes_nothing(reference, tmp_path, capsys, case):
    folder, _ = reference
    bad = str(tmp_path / "bad.h5")
    with h5py.File(folder / "keras.h5", "r") as src, h5py.File(bad, "w") as dst:
        for key in src:
            src.copy(key, dst)
        dst.attrs.update(src.attrs)
        if case == "missing":
            group = dst["block5_sepconv2_bn"]
            group.attrs["weight_names"] = [n for n in _weight_names(group) if not n.endswith("moving_mean")]
            del group["block5_sepconv2_bn/moving_mean"]
            needle = "features.block4.rep.5.running_mean"
        elif case == "extra":
            group = dst["block1_conv1"]
            group.create_dataset("block1_conv1/bias", data=np.zeros(32, np.float32))
            group.attrs["weight_names"] = _weight_names(group) + ["block1_conv1/bias"]
            needle = "block1_conv1/bias"
        else:
            group = dst["block3_sepconv1"]
            del group["block3_sepconv1/depthwise_kernel"]
            group.create_dataset("block3_sepconv1/depthwise_kernel", data=np.zeros((3, 3, 128, 2), np.float32))
            needle = "block3_sepconv1/depthwise_kernel"
    _assert_one_line_failure(capsys, [bad, str(tmp_path / "out" / "bad")], needle, "nothing written")


def test_pth_without_torch_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as in this venv: importing torch fails
    src = tmp_path / "weights.pth"
    src.write_bytes(b"not read")
    _assert_one_line_failure(capsys, [str(src), str(tmp_path / "out" / "x")], "needs torch", ".safetensors")


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    _assert_one_line_failure(capsys, [str(tmp_path / "nope.safetensors"), str(tmp_path / "o")], "not found")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"")
    _assert_one_line_failure(capsys, [str(odd), str(tmp_path / "o")], "--from timm or --from keras")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    _assert_one_line_failure(capsys, [str(junk), str(tmp_path / "o")], "not a readable HDF5 file")
    _assert_one_line_failure(capsys, [str(junk), str(tmp_path / "o"), "--from", "caffe"], "--from")


def test_missing_reference_venv_fails_with_the_build_command(monkeypatch):
    monkeypatch.setattr(helpers, "REF_PYTHON", "/nonexistent/.venv-ref/bin/python")
    with pytest.raises(pytest.fail.Exception, match="bash scripts/setup_ref_venv.sh"):
        ref_run("ref_timm.py")


def _keras_same_pool(x: np.ndarray) -> np.ndarray:
    """TensorFlow's 3x3 stride-2 "same" max pool, written out: pad_total // 2 before, the rest after."""
    def pads(n):
        total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
        return total // 2, total - total // 2

    (top, bottom), (left, right) = pads(x.shape[2]), pads(x.shape[3])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=-np.inf)
    out = np.empty(x.shape[:2] + (-(-x.shape[2] // 2), -(-x.shape[3] // 2)), x.dtype)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(2, 3))
    return out


@pytest.mark.parametrize("hybrid", [False, True])
def test_keras_pool_is_tensorflow_same_padding(hybrid):
    pool = KerasSameMaxPool2D()
    if hybrid:
        pool.hybridize()
    rng = np.random.RandomState(0)
    for h, w in [(74, 74), (37, 37), (10, 11), (147, 146), (6, 5)]:
        x = (rng.standard_normal((2, 3, h, w)) - 6).astype(np.float32)  # all negative: the padding must not win
        np.testing.assert_array_equal(pool(mx.nd.array(x)).asnumpy(), _keras_same_pool(x), err_msg=f"{h}x{w}")
    # The default stays the symmetric pad-1 pool (timm).
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    default = Xception((8, 8, 16, 16, 24, 24, 32)).features.block1.rep[-1]
    default.initialize()
    assert isinstance(default, mx.gluon.nn.MaxPool2D)
    assert not np.array_equal(default(mx.nd.array(x)).asnumpy(), _keras_same_pool(x))


def test_unknown_pool_padding_is_a_value_error():
    with pytest.raises(ValueError, match="pool_padding must be one of 'symmetric', 'keras'"):
        Xception(pool_padding="same")
