"""Shared fixtures: tiny models and images keep the suite fast on a 2-core CPU."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: A narrow filter list: the full topology (12 blocks, 36 separable convs) at a fraction of the cost.
TINY_FILTERS = (8, 8, 16, 16, 24, 24, 32)


@pytest.fixture
def tiny_filters():
    return TINY_FILTERS


def write_colour_shards(folder, prefix, counts_per_shard, num_classes=4, size=80, seed=0):
    """Tiny learnable shards: class k is a noisy image of colour k. Returns the labels written, in order."""
    import cv2
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


# ---------------------------------------------------------------------------------------------------------- markers
# slow / distributed / parity are registered in pyproject.toml and applied here, by module and test name, so that the
# test files carry no marks. `make test-fast` deselects all three.

#: Every test that trains: calls ``train(...)``, runs train_xception.py in a subprocess, or trains under the launcher
#: (each over ~20 s on 2 cores). fnmatch patterns on the test function's name (parametrized cases share it).
SLOW_TESTS = {
    "test_train.py": [
        "test_loss_decreases_and_files_are_written",
        "test_resume_is_bit_exact",
        "test_retrain_starts_at_the_new_lr_and_loads_weights",
        "test_model_load_epoch_without_retrain_is_resume",
        "test_resume_on_fewer_devices_keeps_the_schedule",
        "test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_epoch",
        "test_sigterm_mid_epoch_writes_a_checkpoint_that_resumes",
        "test_bad_input_is_one_clear_line",  # 13 cases, each a train_xception.py process
    ],
    "test_train_safety.py": ["test_*"],  # every test runs train_xception.py
    "test_finetune.py": ["test_*"],  # every test uses the module's `pretrained` training run
    "test_score.py": ["test_scoring_a_trained_export_reproduces_the_trainers_validation"],
    "test_distributed.py": [
        "test_cli_dist_sync_run_resume_and_single_process_resume",
        "test_a_killed_worker_stops_the_job",
        "test_sigint_stops_every_worker_at_the_same_step_and_resumes",
        "test_cli_horovod_run_matches_across_ranks",
        "test_trainer_refuses_a_distributed_store_it_cannot_run",
    ],
}
#: Every test of these modules: multi-process kvstore / Horovod runs through xception_mx.launch.
DISTRIBUTED_MODULES = {"test_distributed.py"}
#: In these modules, the tests that use this fixture: it runs tests/reference/*.py with XCEPTION_MX_REF_PYTHON.
PARITY_FIXTURE = {"test_convert.py": "reference"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    import fnmatch
    import warnings

    modules = {}
    for item in items:
        module = item.path.name
        modules.setdefault(module, getattr(item, "module", None))
        name = getattr(item, "originalname", item.name)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in SLOW_TESTS.get(module, ())):
            item.add_marker(pytest.mark.slow)
        if module in DISTRIBUTED_MODULES:
            item.add_marker(pytest.mark.distributed)
        if module in PARITY_FIXTURE and PARITY_FIXTURE[module] in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.parity)
    # A renamed test or fixture must not silently lose its marker: check the lists against the modules' contents.
    for module, mod in modules.items():
        if mod is None:
            continue
        tests = [n for n in vars(mod) if n.startswith("test")]
        stale = [p for p in SLOW_TESTS.get(module, ()) if not fnmatch.filter(tests, p)]
        if module in PARITY_FIXTURE and not hasattr(mod, PARITY_FIXTURE[module]):
            stale.append(f"fixture {PARITY_FIXTURE[module]!r}")
        if stale:
            warnings.warn(pytest.PytestWarning(f"tests/conftest.py marker lists name nothing in {module}: "
                                               f"{', '.join(stale)}"), stacklevel=1)
