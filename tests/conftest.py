"""Shared fixtures: tiny models and images keep the suite fast on a 2-core CPU."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: A narrow filter list: the full topology (12 blocks, 36 separable convs) at a fraction of the cost.
TINY_FILTERS = (8, 8, 16, 16, 24, 24, 32)


def needs_cpu_flag(flag: str, why: str):
    """Skip (the reason printed: pytest runs with -rs) where /proc/cpuinfo lacks ``flag``."""
    from xception_mx.cpuinfo import cpu_flags, cpu_model

    return pytest.mark.skipif(flag not in cpu_flags(), reason=f"this CPU ({cpu_model()}) lacks {flag}: {why}")


@pytest.fixture
def tiny_filters():
    return TINY_FILTERS


def write_colour_shards(folder, prefix, counts_per_shard, num_classes=4, size=80, seed=0):
    """Tiny learnable shards: class k is a noisy image of colour k. Returns the labels written, in order."""
    import mxnet as mx
    import numpy as np

    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 220), (200, 200, 30), (30, 200, 200)]
    rng = np.random.RandomState(seed)
    labels = []
    n = sum(counts_per_shard)
    index = 0
    for shard, count in enumerate(counts_per_shard):
        base = os.path.join(str(folder), f"{prefix}-{shard:05d}-of-{len(counts_per_shard):05d}")
        writer = mx.recordio.MXIndexedRecordIO(base + ".idx", base + ".rec", "w")
        for _ in range(count):
            label = index % num_classes
            img = np.clip(np.array(colours[label], np.float32) + rng.normal(0, 25, (size, size, 3)), 0, 255)
            header = mx.recordio.IRHeader(0, float(label), index, 0)
            writer.write_idx(index, mx.recordio.pack_img(header, img.astype(np.uint8)[:, :, ::-1], quality=95,
                                                         img_fmt=".jpg"))
            labels.append(label)
            index += 1
        writer.close()
    assert index == n
    return labels


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory):
    """Two training shards (64 images) and one validation shard (22 images: not a multiple of the batch)."""
    folder = tmp_path_factory.mktemp("colour_shards")
    write_colour_shards(folder, "train", [32, 32], seed=1)
    write_colour_shards(folder, "val", [22], seed=2)
    return folder


def timm_state(net) -> dict:
    """Our parameters under timm's names (gamma/beta -> weight/bias), as a timm state dict would hold them."""
    import numpy as np

    state = {}
    for name, param in net._collect_params_with_prefix().items():
        key = name[len("features."):] if name.startswith("features.") else name
        module, _, leaf = key.rpartition(".")
        leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
        state[f"{module}.{leaf}"] = param.data().asnumpy()
        if leaf == "running_var":
            state[f"{module}.num_batches_tracked"] = np.array(7, dtype=np.int64)
    return state


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
