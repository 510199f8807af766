"""Data-parallel training across processes: MXNet's parameter server (``dist_sync``, ``dist_device_sync``) or Horovod.

:class:`Cluster` hides the engine from the training loop: rank, size, the global batch's split, initial sync,
collectives, the per-epoch worker sync and the stop vote. The semantics (the same for both engines) and the ps-lite
workarounds are in ARCHITECTURE.md, "Distributed training".
"""
from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable

import mxnet as mx
import numpy as np
from mxnet import gluon

from .errors import UserError
from .metrics import Accumulator

__all__ = ["Cluster", "create_cluster", "PS_KV_STORES"]

log = logging.getLogger("xception_mx.train")

PS_KV_STORES = ("dist_sync", "dist_device_sync")

#: kvstore keys no parameter uses (parameters are 0..N-1), one per kind of collective (each has a fixed shape).
_KEYS = {"sum": 999_983, "vote": 999_979}


class Cluster:
    """One process of a data-parallel job (or the only one): rank, size and collective helpers."""

    engine = "local"

    def __init__(self, kv_store: str = "device"):
        self.kv_store = kv_store
        self.rank, self.size = 0, 1

    @property
    def distributed(self) -> bool:
        return self.size > 1 or self.engine != "local"

    def local_batch(self, batch_size: int, num_devices: int) -> int:
        """This worker's share of the global batch; UserError when it does not split evenly."""
        if batch_size % (self.size * num_devices):
            raise UserError(f"--batch-size {batch_size} is the global batch and must split evenly over "
                              f"{self.size} worker(s) x {num_devices} device(s): use a multiple of "
                              f"{self.size * num_devices}")
        return batch_size // self.size

    def make_trainer(self, params, optimizer: str, optimizer_params: dict) -> gluon.Trainer:
        return gluon.Trainer(params, optimizer, optimizer_params, kvstore=self.kv_store, update_on_kvstore=False)

    def step_size(self, batch_size: int) -> int:
        """What to pass to ``trainer.step`` so the update is the mean over the global ``batch_size``."""
        return batch_size

    def sync_initial(self, trainer: gluon.Trainer, params) -> None:
        """Give every worker rank 0's parameters before the first step."""
        if not trainer._kv_initialized:
            trainer._init_kvstore()
        if trainer._params_to_init:
            trainer._init_params()

    def allreduce_sum(self, values: Iterable[float], key: str = "sum") -> np.ndarray:
        """Element-wise sum over the workers (float64); every worker gets the same result."""
        return np.asarray(list(values), dtype=np.float64)

    def any(self, flag: bool) -> bool:
        """True on every worker when ``flag`` is true on any."""
        return flag

    def _vote_sum(self, value: float) -> int:
        """The sum over the workers of a small whole number (one scalar collective)."""
        return int(round(value))

    def average_params(self, trainer: gluon.Trainer, arrays: dict[str, mx.nd.NDArray]) -> None:
        """Replace each array (keyed by its Parameter's ``name``) by its mean over the workers, in place: for
        BatchNorm running statistics, which every worker accumulates from its own batches."""

    def broadcast_params(self, trainer: gluon.Trainer, arrays: dict[str, mx.nd.NDArray]) -> None:
        """Give every worker rank 0's values of these arrays (keyed by Parameter ``name``), in place."""

    def barrier(self) -> None:
        pass

    # Built on the collectives above; the same for every engine.

    def vote(self, stop, checkpoint_due: bool = False) -> tuple[bool, bool]:
        """(stop, checkpoint now), true on every worker when true on any (``stop``: a StopFlag; every worker then
        stops, or saves, at the same step). One collective per step in a distributed run."""
        if not self.distributed:
            return stop.signum is not None, checkpoint_due
        # One scalar through the "vote" key (a multi-element collective can come back partly stale with ps-lite,
        # see PSCluster.average_params): stop count + (W + 1) * due count, summed over the W workers.
        code = self._vote_sum(float(stop.signum is not None) + (self.size + 1) * float(checkpoint_due))
        stops, dues = code % (self.size + 1), code // (self.size + 1)
        if stops > 0:
            stop.signum = stop.signum or signal.SIGTERM  # another worker got the signal
        return stops > 0, dues > 0

    def sum_accumulator(self, acc: Accumulator) -> Accumulator:
        """Counts summed over the workers (each saw a disjoint part of the data); unchanged in one process."""
        if not self.distributed:
            return acc
        count, loss_sum, c1, c5 = self.allreduce_sum([acc.count, acc.loss_sum, acc.correct[1], acc.correct[5]])
        return Accumulator(int(round(count)), loss_sum, {1: int(round(c1)), 5: int(round(c5))})

    def sync_workers(self, named: dict, ema_shadow: dict | None, ctx: mx.Context, trainer: gluon.Trainer) -> None:
        """End of an epoch (or a stop): average the BatchNorm running statistics (and their EMA shadows) over the
        workers, which accumulate them from their own batches, and give every worker rank 0's trainable weights
        (bounds the drift described above; the checkpoint rank 0 writes is then what every worker holds)."""
        aux = [name for name, p in named.items() if p.grad_req == "null"]
        self.average_params(trainer, {named[n].name: named[n].data(ctx) for n in aux})
        if ema_shadow is not None:
            self.average_params(trainer, {named[n].name: ema_shadow[n] for n in aux})
        trainable = [name for name, p in named.items() if p.grad_req != "null"]
        self.broadcast_params(trainer, {named[n].name: named[n].data(ctx) for n in trainable})
        for name in aux + trainable:  # every device of this worker gets the result
            named[name].set_data(named[name].data(ctx))


class PSCluster(Cluster):
    """MXNet's ps-lite parameter server; the launcher (xception_mx.launch) sets the DMLC_* environment."""

    engine = "ps-lite"

    def __init__(self, kv_store: str):
        super().__init__(kv_store)
        self.kv = mx.kv.create(kv_store)
        # Shard by kv.rank: ps-lite assigns ranks in the order the workers register, not by DMLC_TASK_ID.
        self.rank, self.size = self.kv.rank, self.kv.num_workers
        self._keys: set[int] = set()

    def make_trainer(self, params, optimizer: str, optimizer_params: dict) -> gluon.Trainer:
        # update_on_kvstore=False: the servers only sum gradients, the optimizer (and its state, which we save
        # without pickle) lives on the workers.
        return gluon.Trainer(params, optimizer, optimizer_params, kvstore=self.kv, update_on_kvstore=False)

    def sync_initial(self, trainer: gluon.Trainer, params) -> None:
        # Trainer._init_params broadcasts: rank 0 initialises each key on the servers (with the weights it
        # initialised or loaded from the checkpoint), every worker pulls them; the barrier keeps any worker from
        # pushing a gradient before all have pulled.
        super().sync_initial(trainer, params)
        mx.nd.waitall()
        self.barrier()

    def average_params(self, trainer: gluon.Trainer, arrays: dict[str, mx.nd.NDArray]) -> None:
        # Through the parameters' own kvstore keys (Trainer._init_params initialised one per parameter, BN
        # statistics included, with their shape and dtype), exactly as gradients are reduced. A separate key
        # holding all statistics as one float64 vector gave, now and then, a reply whose leading part was not
        # the sum (a resumed run then saved other statistics than an uninterrupted one).
        for name, array in arrays.items():
            index = trainer._param2idx[name]
            self.kv.pushpull(index, array, priority=-index)
            array /= self.size
        mx.nd.waitall()

    def broadcast_params(self, trainer: gluon.Trainer, arrays: dict[str, mx.nd.NDArray]) -> None:
        # Rank 0's values through the parameters' keys: every other worker pushes zeros, and x + 0 == x exactly.
        for name, array in arrays.items():
            index = trainer._param2idx[name]
            send = array.copy() if self.rank == 0 else mx.nd.zeros(array.shape, array.context, dtype=array.dtype)
            self.kv.pushpull(index, send, out=array, priority=-index)
        mx.nd.waitall()

    def _collective(self, name: str, values: np.ndarray) -> np.ndarray:
        key = _KEYS[name]
        local = mx.nd.array(values, dtype="float64")
        if key not in self._keys:  # kv.init is collective too: every worker calls it once, with the same shape
            self.kv.init(key, mx.nd.zeros(local.shape, dtype="float64"))
            self._keys.add(key)
        # dist_sync without a server optimizer: the server replaces the value with the sum of the workers'
        # pushes. One pushpull request, not push then pull: a separate pull can be answered with a partly
        # updated value (seen here on the second use of a key: stale leading elements), pushpull is answered
        # with the complete sum, as the Trainer's gradient reduction is.
        out = mx.nd.zeros(local.shape, dtype="float64")
        self.kv.pushpull(key, local, out=out)
        return out.asnumpy()

    def allreduce_sum(self, values: Iterable[float], key: str = "sum") -> np.ndarray:
        return self._collective(key, np.asarray(list(values), dtype=np.float64))

    def any(self, flag: bool) -> bool:
        return self._vote_sum(1.0 if flag else 0.0) > 0

    def _vote_sum(self, value: float) -> int:
        return int(round(self._collective("vote", np.array([value]))[0]))

    def barrier(self) -> None:
        self.kv._barrier()


class HorovodCluster(Cluster):
    """Horovod (gloo or MPI) through ``horovod.mxnet``: one process per device, launched with ``horovodrun``.

    ``mx.kv.create('horovod')`` in MXNet 1.9.1 silently falls back to a local store when used as a Trainer's
    kvstore string, so the trainer is ``horovod.mxnet.DistributedTrainer`` explicitly.
    """

    engine = "horovod"

    def __init__(self, kv_store: str = "horovod"):
        super().__init__(kv_store)
        try:
            import horovod.mxnet as hvd
        except ImportError as exc:
            raise UserError(f"--kv-store horovod needs horovod built for MXNet ({exc}): run "
                              f"scripts/install_horovod.sh .venv/bin/python (or pip install -e '.[horovod]' "
                              f"with the HOROVOD_* build flags in the README)") from None
        self.hvd = hvd
        hvd.init()
        self.rank, self.size = hvd.rank(), hvd.size()

    def make_trainer(self, params, optimizer: str, optimizer_params: dict) -> gluon.Trainer:
        return self.hvd.DistributedTrainer(params, optimizer, optimizer_params)

    def step_size(self, batch_size: int) -> int:
        # DistributedTrainer sums gradients across processes and already scales by 1/size.
        return batch_size // self.size

    def sync_initial(self, trainer: gluon.Trainer, params) -> None:
        super().sync_initial(trainer, params)
        self.hvd.broadcast_parameters(params, root_rank=0)
        mx.nd.waitall()

    def allreduce_sum(self, values: Iterable[float], key: str = "sum") -> np.ndarray:
        local = mx.nd.array(np.asarray(list(values), dtype=np.float64), dtype="float64")
        return self.hvd.allreduce(local, average=False, name=f"xception_{key}").asnumpy()

    def any(self, flag: bool) -> bool:
        return self._vote_sum(1.0 if flag else 0.0) > 0

    def _vote_sum(self, value: float) -> int:
        local = mx.nd.array([value])
        return int(round(self.hvd.allreduce(local, average=False, name="xception_vote").asscalar()))

    def broadcast_params(self, trainer: gluon.Trainer, arrays: dict[str, mx.nd.NDArray]) -> None:
        for name, array in arrays.items():
            array[:] = self.hvd.broadcast(array, root_rank=0, name=f"xception_bcast_{name}")

    def average_params(self, trainer: gluon.Trainer, arrays: dict[str, mx.nd.NDArray]) -> None:
        for name, array in arrays.items():
            array[:] = self.hvd.allreduce(array, average=True, name=f"xception_avg_{name}")

    def barrier(self) -> None:
        self.allreduce_sum([0.0])


def create_cluster(kv_store: str, num_devices: int) -> Cluster:
    """The cluster for ``--kv-store``: ps-lite for dist_*, Horovod for horovod, else this process alone."""
    if kv_store in PS_KV_STORES:
        if "DMLC_ROLE" not in os.environ:
            raise UserError(f"--kv-store {kv_store} runs under the launcher: python -m xception_mx.launch -n "
                              f"WORKERS -s SERVERS -- train_xception.py ... (DMLC_ROLE is not set)")
        return PSCluster(kv_store)
    if kv_store == "horovod":
        if num_devices > 1:
            raise UserError(f"--kv-store horovod runs one process per device, but this process was given "
                              f"{num_devices} devices: pass one --gpus id (or --cpus 1) and start one process "
                              f"per device with horovodrun")
        return HorovodCluster(kv_store)
    return Cluster(kv_store)
