"""Distributed training on loopback, the training step: 2 workers of a ps-lite job (dist_sync, dist_device_sync) or
a Horovod job, launched through xception_mx.launch (also over a stand-in ssh), end with the weights of one process
trained on the union batch.

Every process runs under a timeout (the launcher's --timeout, and subprocess's timeout around the launcher), binds to
127.0.0.1 only, and the models are tiny. Horovod is installed by the test command (scripts/install_horovod.sh), so
its tests run rather than skip.
"""
import textwrap

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from helpers import launch, no_bn_net
from xception_mx.step import TrainStep

pytestmark = pytest.mark.distributed

STEPS, GLOBAL_BATCH = 3, 8

TRAINER_WORKER = textwrap.dedent("""
    # One worker of a data-parallel job on a no-BN net: rank r trains on rows [r*k, (r+1)*k) of one fixed global
    # batch. Each rank initialises with a different seed: only the initial sync from rank 0 makes them agree.
    # Optional: micro-batches to accumulate per update and a gradient-norm limit.
    import os, sys
    import mxnet as mx, numpy as np
    from mxnet import gluon
    from xception_mx.distributed import create_cluster
    from xception_mx.step import TrainStep
    kv_store, out, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    accumulate, clip = (int(sys.argv[5]), float(sys.argv[6])) if len(sys.argv) > 5 else (1, 0.0)
    cluster = create_cluster(kv_store, 1)
    rank, size = cluster.rank, cluster.size
    rng = np.random.RandomState(0)
    x = mx.nd.array(rng.uniform(-1, 1, (batch, 3, 12, 12)))
    y = mx.nd.array(np.arange(batch) % 3)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=3), gluon.nn.Activation("relu"), gluon.nn.GlobalAvgPool2D(),
            gluon.nn.Dense(3, in_units=4))
    mx.random.seed(3 + 100 * rank)
    net.initialize(mx.init.Xavier())
    trainer = cluster.make_trainer(net.collect_params(), "nag", {"learning_rate": 0.5, "momentum": 0.9})
    cluster.sync_initial(trainer, net.collect_params())
    k = batch // size
    step = TrainStep(net, trainer, gluon.loss.SoftmaxCrossEntropyLoss(), [mx.cpu()], cluster.step_size(batch),
                     accumulate, clip)
    for _ in range(steps):
        part = slice(rank * k, (rank + 1) * k)
        step(x[part], y[part], y[part])
    assert cluster.allreduce_sum([1.0, rank]).tolist() == [size, sum(range(size))]
    assert cluster.any(rank == size - 1) and not cluster.any(False)
    np.savez(os.path.join(out, f"rank{rank}.npz"), *[p.data().asnumpy() for p in net.collect_params().values()])
    print(f"rank {rank} engine {os.environ.get('MXNET_ENGINE_TYPE', 'threaded')} done", flush=True)
""")


def _no_bn_reference(steps, batch, clip=0.0):
    """Single-process training on the whole global batch (rank 0's seed), no accumulation."""
    rng = np.random.RandomState(0)
    x = mx.nd.array(rng.uniform(-1, 1, (batch, 3, 12, 12)))
    y = mx.nd.array(np.arange(batch) % 3)
    net = no_bn_net(mx.cpu())
    initial = [p.data().asnumpy().copy() for p in net.collect_params().values()]
    trainer = gluon.Trainer(net.collect_params(), "nag", {"learning_rate": 0.5, "momentum": 0.9},
                            update_on_kvstore=False)
    step = TrainStep(net, trainer, gluon.loss.SoftmaxCrossEntropyLoss(), [mx.cpu()], batch, clip_grad_norm=clip)
    for _ in range(steps):
        step(x, y, y)
    return initial, [p.data().asnumpy() for p in net.collect_params().values()]


def _check_ranks_match_reference(out, workers, clip=0.0):
    initial, reference = _no_bn_reference(STEPS, GLOBAL_BATCH, clip)
    if clip:  # the limit binds: clipped training differs from unclipped
        assert not np.allclose(reference[0], _no_bn_reference(STEPS, GLOBAL_BATCH)[1][0], rtol=1e-3)
    ranks = []
    for r in range(workers):
        with np.load(out / f"rank{r}.npz") as f:
            ranks.append([f[f"arr_{i}"] for i in range(len(f.files))])
    assert not np.allclose(reference[0], initial[0])  # training moved the weights
    for r in range(1, workers):
        for a, b in zip(ranks[0], ranks[r]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # the same on every worker
    for got, want in zip(ranks[0], reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_store, extra", [("dist_sync", ()), ("dist_device_sync", ()), ("dist_sync", (2, 0.05))],
                         ids=["dist_sync", "dist_device_sync", "dist_sync-accumulate-clip"])
def test_ps_workers_match_single_process_on_the_union_batch(kv_store, extra, tmp_path):
    """2 workers + 1 server == one process on the union batch. Also the regression test of the initial-weights
    workaround (xception_mx.distributed.PSCluster.sync_initial): the ranks start from different random weights,
    and Gluon's lazy kvstore initialisation would compute their first gradients on them (dmlc/gluon-nlp#1334)."""
    script = tmp_path / "worker.py"
    script.write_text(TRAINER_WORKER)
    result = launch(["-n", "2", "-s", "1", "--", str(script), kv_store, str(tmp_path), str(STEPS),
                     str(GLOBAL_BATCH), *map(str, extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done") == 2
    _check_ranks_match_reference(tmp_path, 2, extra[1] if extra else 0.0)


@pytest.mark.parametrize("extra", [(), (2, 0.05)], ids=["plain", "accumulate-clip"])
def test_horovod_ranks_match_single_process_on_the_union_batch(extra, tmp_path):
    import horovod.mxnet  # noqa: F401  (installed by the test command: an ImportError is a failure, not a skip)

    script = tmp_path / "worker.py"
    script.write_text(TRAINER_WORKER)
    result = launch(["--horovod", "-n", "2", "--", str(script), "horovod", str(tmp_path), str(STEPS),
                     str(GLOBAL_BATCH), *map(str, extra)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done") == 2
    _check_ranks_match_reference(tmp_path, 2, extra[1] if extra else 0.0)


# ------------------------------------------------------------------------------- the launcher's ssh path

def test_hosts_file_over_ssh_runs_the_same_job(tmp_path):
    """--hosts with a stand-in for ssh that runs the remote command here: the quoting, the environment and the
    stdin guard of the ssh path, on loopback."""
    fake_ssh = tmp_path / "fake_ssh"
    fake_ssh.write_text("#!/bin/sh\n# fake_ssh HOST COMMAND: run COMMAND here (HOST is 127.0.0.1 in the test)\n"
                        "shift\nexec bash -c \"$1\"\n")
    fake_ssh.chmod(0o755)
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# two 'machines', both this one\n127.0.0.1\n127.0.0.1\n")
    script = tmp_path / "worker.py"
    script.write_text(TRAINER_WORKER)
    from xception_mx.launch import free_port

    result = launch(["-n", "2", "-s", "1", "--hosts", str(hosts), "--interface", "lo", "--port", str(free_port()),
                     "--ssh", str(fake_ssh), "--", str(script), "dist_sync", str(tmp_path), str(STEPS),
                     str(GLOBAL_BATCH)])
    assert result.returncode == 0, result.stderr[-3000:]
    _check_ranks_match_reference(tmp_path, 2)
