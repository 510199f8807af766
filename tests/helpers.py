"""Helpers shared by the test modules; the fixtures built on them live in conftest.py.

Test modules import them by name (``from helpers import base_args``), like ``shard_factory``: tests/ is not a
package, so pytest's default import mode puts this folder on ``sys.path`` when it collects conftest.py.
"""
import contextlib
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

#: The repository (train_xception.py, score.py); subprocesses run here.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: A narrow filter list: the full topology (12 blocks, 36 separable convs) at a fraction of the cost.
TINY_FILTERS = (8, 8, 16, 16, 24, 24, 32)
#: The model prefix of every run ``base_args`` makes.
PREFIX = "xception_slim"
#: metrics.jsonl keys that differ between two runs of the same computation.
TIME_KEYS = ("samples_per_sec", "time_s", "rss_mib")


def needs_cpu_flag(flag: str, why: str):
    """Skip (the reason printed: pytest runs with -rs) where /proc/cpuinfo lacks ``flag``."""
    from xception_mx.cpuinfo import cpu_flags, cpu_model

    return pytest.mark.skipif(flag not in cpu_flags(), reason=f"this CPU ({cpu_model()}) lacks {flag}: {why}")


# ----------------------------------------------------------------------------------------------------------- data

def write_colour_shards(folder, prefix, counts_per_shard, num_classes=4, size=80, seed=0):
    """Tiny learnable shards: class k is a noisy image of colour k. Returns the labels written, in order."""
    import mxnet as mx

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


def timm_state(net) -> dict:
    """Our parameters under timm's names (gamma/beta -> weight/bias), as a timm state dict would hold them."""
    state = {}
    for name, param in net._collect_params_with_prefix().items():
        key = name[len("features."):] if name.startswith("features.") else name
        module, _, leaf = key.rpartition(".")
        leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
        state[f"{module}.{leaf}"] = param.data().asnumpy()
        if leaf == "running_var":
            state[f"{module}.num_batches_tracked"] = np.array(7, dtype=np.int64)
    return state


# -------------------------------------------------------------------------------------------------------- trainer

def base_args(shards, out, *extra, preprocess_threads=2):
    """train_xception.py arguments of a 2-epoch run of the tiny model on the colour shards at ``shards``."""
    return ["--train-rec", str(shards / "train"), "--val-rec", str(shards / "val"), "--num-classes", "4",
            "--model", PREFIX, "--filter-list", ",".join(map(str, TINY_FILTERS)), "--input-size", "72",
            "--batch-size", "16", "--num-epochs", "2", "--optimizer", "nag", "--lr", "0.05", "--lr-mode", "cosine",
            "--wd", "1e-4", "--min-area", "0.5", "--preprocess-threads", str(preprocess_threads), "--dropout", "0.2",
            "--bn-momentum", "0.5", "--output-dir", str(out), "--log-interval", "2", *extra]


def run(args):
    """Plan and train in this process; returns what ``Trainer.fit`` returns."""
    from xception_mx.plan import plan_run
    from xception_mx.train import Trainer

    return Trainer(plan_run(args)).fit()


def train_cli(args, timeout=240):
    """train_xception.py ``args`` in a subprocess; returns the CompletedProcess (text output captured)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_xception.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def score_cli(*args, timeout=240):
    """score.py ``args`` (any type: made strings) in a subprocess; returns the CompletedProcess (text captured)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def popen_train(args, **kwargs):
    """train_xception.py ``args`` started in a subprocess, stdout and stderr piped as text."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train_xception.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_line(proc, fragment, timeout=180):
    """Read ``proc``'s stdout up to the first line holding ``fragment`` and return that line; fails when
    ``timeout`` seconds pass first, or when the process ends without printing it."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if fragment in line:
            return line
        assert time.time() < deadline, f"no line with {fragment!r}"
    raise AssertionError(f"the process ended before printing {fragment!r}")


def signal_at_line(proc, fragment, sig, timeout=180):
    """Send ``sig`` to ``proc`` as soon as it prints a line holding ``fragment`` (see ``wait_for_line``)."""
    line = wait_for_line(proc, fragment, timeout)
    proc.send_signal(sig)
    return line


def one_line(result) -> str:
    """The single stderr line of a failed run (MXNet's ``[...]`` log lines aside), with no traceback."""
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def state_params(out, epoch, prefix=PREFIX):
    """The arrays of the run folder ``out``'s state checkpoint of ``epoch``, as numpy."""
    from xception_mx.checkpoint import load_state
    from xception_mx.runfolder import RunFolder

    return {k: v.asnumpy() for k, v in load_state(RunFolder(str(out), prefix), epoch).items()}


def assert_same_states(a_dir, b_dir, epoch, prefix=PREFIX) -> dict:
    """Two runs' checkpoints of ``epoch`` hold the same arrays, bit for bit; returns the first's."""
    a, b = state_params(a_dir, epoch, prefix), state_params(b_dir, epoch, prefix)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    return a


def straight_and_resumed(shards, tmp_path, *extra):
    """A 2-epoch run, and a copy "crashed" after epoch 1 (epoch 2's checkpoint removed) resumed in a new process."""
    from xception_mx.runfolder import RunFolder

    straight = tmp_path / "straight"
    result = train_cli(base_args(shards, straight, *extra))
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    RunFolder(str(resumed), PREFIX).remove(2)
    result = train_cli(base_args(shards, resumed, *extra, "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    return straight, resumed


def strip_times(records):
    """metrics.jsonl records without their timings (``TIME_KEYS``)."""
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def no_bn_net(ctx):
    """A tiny conv net without BatchNorm (3 classes, 3-channel input), Xavier-initialised from seed 3 on ``ctx``."""
    import mxnet as mx
    from mxnet import gluon

    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=3), gluon.nn.Activation("relu"), gluon.nn.GlobalAvgPool2D(),
            gluon.nn.Dense(3, in_units=4))
    mx.random.seed(3)
    net.initialize(mx.init.Xavier(), ctx=ctx)
    return net


# ----------------------------------------------------------------------------------------------- distributed runs

#: The launcher's command line, before its arguments.
LAUNCH = [sys.executable, "-m", "xception_mx.launch"]


def launcher_env() -> dict:
    """This environment for a launched job: the repository importable, MXNet's engine left to the trainer."""
    env = dict(os.environ)
    env.pop("MXNET_ENGINE_TYPE", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launch(args, timeout=180, env=None):
    """Run the launcher with its own --timeout below ``timeout``; returns the CompletedProcess."""
    return subprocess.run([*LAUNCH, "--timeout", str(timeout - 30), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env or launcher_env())


# --------------------------------------------------------------------------------- weight-conversion references

#: The reference scripts (timm, Keras), run by the reference venv's python.
REF_DIR = os.path.join(ROOT, "tests", "reference")
REF_PYTHON = os.environ.get("XCEPTION_MX_REF_PYTHON", os.path.join(ROOT, ".venv-ref", "bin", "python"))
#: The largest |logit difference| a converted network may show against its reference.
TOLERANCE = 1e-4
#: 299: Keras's block-2 pool sees 74 px (even: asymmetric "same" padding). 165 x 150: every pool input side is even
#: in H (80, 40, 20, 10) and three of four in W (72, 36, 18, 9), so the asymmetric case dominates.
SIZES = {"x299": (299, 299), "x165x150": (165, 150)}


def ref_run(script: str, *args: str, timeout: int = 900) -> str:
    """Run tests/reference/``script`` with the reference venv's python; returns its last stdout line. A missing
    venv or a failing script fails the test (never skips it) with the command that rebuilds the venv."""
    if not os.access(REF_PYTHON, os.X_OK):
        pytest.fail(f"reference venv missing ({REF_PYTHON}): build it with `bash scripts/setup_ref_venv.sh` "
                    f"(`make test` does), or point XCEPTION_MX_REF_PYTHON at a python with torch, timm, keras, h5py",
                    pytrace=False)
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    proc = subprocess.run([REF_PYTHON, os.path.join(REF_DIR, script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{script} failed in the reference venv ({REF_PYTHON}); rebuild it with "
                    f"`bash scripts/setup_ref_venv.sh`:\n{proc.stderr[-3000:]}", pytrace=False)
    return proc.stdout.strip().splitlines()[-1]


def write_inputs(folder, seed: int) -> list[str]:
    """Two random images in [-1, 1] at each of SIZES, as NAME.npy files for the reference scripts."""
    rng = np.random.RandomState(seed)
    inputs = []
    for name, (h, w) in SIZES.items():
        path = str(folder / f"{name}.npy")
        np.save(path, rng.uniform(-1, 1, (2, 3, h, w)).astype(np.float32))
        inputs.append(path)
    return inputs


# ---------------------------------------------------------------------------------------------- padded widths

def assert_added_channels_zero(trainer):
    """Every added channel of every parameter, optimizer state and EMA weight is exactly zero (in memory)."""
    import numpy as np

    from xception_mx.optim_state import optimizer_state_arrays

    layout = trainer.layout
    arrays = {f"param/{n}": p.data() for n, p in trainer.named.items()}
    arrays.update(optimizer_state_arrays(trainer.trainer, trainer.names)[0])
    if trainer.ema is not None:
        arrays.update({f"ema/{n}": a for n, a in trainer.ema.arrays().items()})
    checked = 0
    for key, array in arrays.items():
        owner = layout._owner(key)
        if owner is None:
            continue
        data = array.asnumpy()
        inside = data[tuple(slice(0, n) for n in layout.shapes[owner][0])]
        assert np.count_nonzero(data) == np.count_nonzero(inside), key
        checked += 1
    assert checked > 100


@contextlib.contextmanager
def tmpfs(folder, size: str):
    """A real tmpfs of ``size`` (``3m``) mounted at ``folder`` (made here) for the block; root only (CI and these
    machines run as root), skipped with the reason elsewhere."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
