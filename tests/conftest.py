"""Shared fixtures: tiny models and images keep the suite fast on a 2-core CPU. Plain helpers: helpers.py."""
import pytest

from helpers import TINY_FILTERS, timm_state, write_colour_shards


@pytest.fixture
def tiny_filters():
    return TINY_FILTERS


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory):
    """Two training shards (64 images) and one validation shard (22 images: not a multiple of the batch).

    Read-only for the tests (a test that damages a shard copies the folder first). At --batch-size 4 an epoch is
    16 steps: room for mid-epoch and recovery checkpoints."""
    folder = tmp_path_factory.mktemp("colour_shards")
    write_colour_shards(folder, "train", [32, 32], seed=1)
    write_colour_shards(folder, "val", [22], seed=2)
    return folder


@pytest.fixture
def tiny_timm(tmp_path, tiny_filters):
    """A timm-layout .safetensors of a small random Xception (non-trivial BN statistics) and that network."""
    import mxnet as mx
    from safetensors.numpy import save_file

    from xception_mx.model import Xception

    mx.random.seed(3)
    net = Xception(tiny_filters, num_classes=6, bn_epsilon=1e-5)
    net.initialize()
    for name, param in net._collect_params_with_prefix().items():
        if name.endswith(("running_mean", "beta", "bias")):
            param.set_data(mx.nd.random.normal(0, 0.1, param.shape))
        elif name.endswith(("running_var", "gamma")):
            param.set_data(mx.nd.random.uniform(0.5, 1.5, param.shape))
    path = str(tmp_path / "tiny.safetensors")
    save_file(timm_state(net), path)
    return path, net
