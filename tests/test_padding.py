"""Padded widths (``channel_multiple``): every registered model, at widths rounded up to a multiple of 16, computes
the paper-width network's function on the same canonical weights, with its added channels zero, the paper's
parameter names and counts, and a mapping to the paper's shapes and back that loses nothing."""
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from helpers import ROOT, assert_added_channels_zero, needs_cpu_flag
from xception_mx.model import Xception, count_parameters
from xception_mx.padding import ChannelLayout, round_up
from xception_mx.registry import get_model, list_models
from xception_mx.weights import named_params

#: Widths that are not multiples of 16 in every position (the stem's first conv has 10 // 2 = 5 channels).
ODD_FILTERS = (10, 12, 20, 28, 36, 44, 52)


def _randomised(net, seed):
    """Random weights and BatchNorm statistics (non-trivial running mean and variance), as the canonical source."""
    mx.random.seed(seed)
    net.initialize()
    for name, param in named_params(net).items():
        if name.endswith(("running_mean", "beta", "bias")):
            param.set_data(mx.nd.random.normal(0, 0.1, param.shape))
        elif name.endswith(("running_var", "gamma")):
            param.set_data(mx.nd.random.uniform(0.5, 1.5, param.shape))
    return net


def _pair(make, multiple=16):
    """A paper-width network with random weights, and the padded one loaded with its weights through the layout."""
    canonical = _randomised(make(1), seed=5)
    padded = make(multiple)
    padded.initialize()
    layout = ChannelLayout.of(padded)
    arrays = layout.to_padded({n: p.data() for n, p in named_params(canonical).items()})
    for name, param in named_params(padded).items():
        param.set_data(arrays[name])
    return canonical, padded, layout


def test_round_up():
    assert [round_up(c, 16) for c in (1, 16, 17, 364, 728, 2048)] == [16, 16, 32, 368, 736, 2048]
    assert round_up(728, 1) == 728 and round_up(728, 8) == 728
    with pytest.raises(ValueError, match="channel_multiple"):
        round_up(8, 0)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_computes_the_paper_function_when_padded(name):
    canonical, padded, layout = _pair(lambda m: get_model(name, num_classes=10, channel_multiple=m))
    # Every convolution and BatchNorm width is a multiple of 16 but the input's 3 channels; names are the paper's.
    assert set(named_params(padded)) == set(named_params(canonical)) and layout.shapes
    for pname, param in named_params(padded).items():
        dims = param.shape[:2] if pname.endswith("weight") and len(param.shape) == 4 else param.shape[:1]
        assert all(d % 16 == 0 or d in (1, 3, 10) for d in dims), (pname, param.shape)
    assert count_parameters(padded) == count_parameters(canonical)
    x = mx.nd.random.uniform(-1, 1, (2, 3, 71, 71))
    expected = canonical(x).asnumpy()
    np.testing.assert_allclose(padded(x).asnumpy(), expected, rtol=0, atol=1e-5)
    padded.hybridize(static_alloc=True, static_shape=True)  # the graph the trainer and exports run
    np.testing.assert_allclose(padded(x).asnumpy(), expected, rtol=0, atol=1e-5)


def test_a_padded_network_initialises_its_added_channels_to_zero_and_maps_back_losslessly():
    net = Xception(ODD_FILTERS, num_classes=7, channel_multiple=16)
    net.initialize()
    layout = ChannelLayout.of(net)
    named = named_params(net)
    for name, (canonical, padded) in layout.shapes.items():
        data = named[name].data().asnumpy()
        assert data.shape == padded
        inside = data[tuple(slice(0, n) for n in canonical)]
        assert np.count_nonzero(data) == np.count_nonzero(inside), name  # nothing outside the paper's slice
    arrays = {f"param/{n}": p.data() for n, p in named.items()}
    arrays.update({f"optim/{n}.1": p.data() * 2 for n, p in named.items()})  # an Adam-like second state
    canonical = layout.to_canonical(arrays)
    twin = {n: p.shape for n, p in named_params(net.canonical_twin()).items()}
    assert all(canonical[f"param/{n}"].shape == twin[n] == canonical[f"optim/{n}.1"].shape for n in twin)
    back = layout.to_padded(canonical)
    assert all(np.array_equal(back[k].asnumpy(), arrays[k].asnumpy()) for k in arrays)


def test_a_new_classifier_of_a_padded_network_keeps_the_added_inputs_zero():
    net = Xception(ODD_FILTERS, num_classes=4, channel_multiple=16)
    net.initialize()
    net.reset_classifier(9)
    weight = net.fc.weight.data().asnumpy()
    assert weight.shape == (9, 64) and np.count_nonzero(weight[:, 52:]) == 0 and np.count_nonzero(weight[:, :52])


# Training with padded widths ---------------------------------------------------------------------------------------

ODD = ",".join(map(str, ODD_FILTERS))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, extra", [
    ("sgd", ["--ema", "0.9", "--mixup", "0.2"]),
    ("nag", ["--label-smoothing", "0.1", "--accumulate", "2", "--clip-grad-norm", "0.5"]),
    ("rmsprop", ["--no-wd-bn-bias"]),
    ("adam", ["--ema", "0.8", "--label-smoothing", "0.1"]),
])
def test_added_channels_stay_exactly_zero_through_training(colour_shards, tmp_path, optimizer, extra):
    from helpers import base_args
    from xception_mx.plan import plan_run
    from xception_mx.train import Trainer

    args = base_args(colour_shards, tmp_path / "run", "--filter-list", ODD, "--optimizer", optimizer,
                     "--lr", "0.01", "--wd", "1e-2", "--max-batches", "3", "--channel-multiple", "16", *extra)
    trainer = Trainer(plan_run(args))
    trainer.fit()
    assert_added_channels_zero(trainer)


@pytest.mark.slow
@needs_cpu_flag("avx512_bf16", "--amp bfloat16 is refused without it")
def test_added_channels_stay_exactly_zero_under_bfloat16(colour_shards, tmp_path):
    from helpers import base_args

    args = base_args(colour_shards, tmp_path / "run", "--filter-list", ODD, "--amp", "bfloat16", "--ema", "0.9",
                     "--max-batches", "3", "--channel-multiple", "16", "--num-epochs", "1", "--lr-mode", "exp")
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"  # amp.init patches MXNet for the whole process
              "from helpers import assert_added_channels_zero\n"
              "from xception_mx.plan import plan_run\n"
              "from xception_mx.train import Trainer\n"
              "trainer = Trainer(plan_run(sys.argv[2:]))\n"
              "trainer.fit()\n"
              "assert_added_channels_zero(trainer)\n"
              "print('added channels zero')\n")
    result = subprocess.run([sys.executable, "-c", script, os.path.join(ROOT, "tests"), *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "added channels zero" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_files_keep_the_paper_shapes_and_a_run_resumes_across_channel_multiples(colour_shards, tmp_path):
    """A padded run resumed in a new process is bit-exact; its checkpoints and exports hold the paper's shapes; the
    same checkpoint loaded at 1 and at 16 gives the same network (logits equal within fp32 rounding)."""
    from helpers import assert_same_states, state_params, straight_and_resumed
    from xception_mx.inference import load_exported
    from xception_mx.plan import plan_run
    from xception_mx.train import Trainer

    straight, resumed = straight_and_resumed(colour_shards, tmp_path, "--filter-list", ODD, "--channel-multiple",
                                             "16", "--max-batches", "3")
    assert_same_states(straight, resumed, 2)
    twin = {f"param/{n}": p.shape for n, p in named_params(Xception(ODD_FILTERS, num_classes=4)).items()}
    assert {k: v.shape for k, v in state_params(straight, 1).items() if k.startswith("param/")} == twin
    net = load_exported(str(straight / "xception_slim"), 1, [mx.cpu()])  # a paper-width export, loadable as is
    x = mx.nd.random.uniform(-1, 1, (2, 3, 72, 72))
    logits = {}
    for multiple in ("1", "16"):
        trainer = Trainer(plan_run(["--output-dir", str(straight), "--resume", "1", "--channel-multiple", multiple]))
        assert trainer.net.channel_multiple == int(multiple)
        logits[multiple] = trainer.net(x).asnumpy()
    np.testing.assert_allclose(logits["1"], logits["16"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(net(x).asnumpy(), logits["1"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["xception_slim", "xception41"])
def test_a_padded_network_starts_from_the_weights_of_the_paper_width_one(name):
    """From the same seed, runs at 1 and 16 start from the same canonical weights (the twin draws them)."""
    mx.random.seed(11)
    paper = get_model(name, num_classes=10)
    paper.initialize()
    mx.random.seed(11)
    padded = get_model(name, num_classes=10, channel_multiple=16)
    padded.initialize()
    canonical = ChannelLayout.of(padded).to_canonical({n: p.data() for n, p in named_params(padded).items()})
    for name_, param in named_params(paper).items():
        np.testing.assert_array_equal(canonical[name_].asnumpy(), param.data().asnumpy(), err_msg=name_)
