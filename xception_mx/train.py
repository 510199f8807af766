"""The Trainer: built from a ``RunPlan``; ``fit()`` is the epoch loop, ``state()``/``restore()`` one symmetric pair.

Exactness: epoch k's randomness (data order, augmentation, dropout, mixup) is seeded from (seed, k) alone, and
``state()`` holds the weights, BN statistics, optimizer states and counters, EMA weights and progress bit for bit,
so a run resumed at an epoch boundary reproduces an uninterrupted one exactly (on CPU; cuDNN may pick
non-deterministic kernels on GPUs). A SIGINT/SIGTERM checkpoint taken mid-epoch resumes with the same data order.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass

import mxnet as mx
import numpy as np
import yaml
from mxnet import gluon

from . import data, finetune
from .board import Board
from .builders import build_net, build_schedule, optimizer_params, train_data, val_data
from .checkpoint import disk_errors, export_atomic, load_state, save_checkpoint
from .config import dump_yaml
from .console import log_to_file
from .device_metrics import DeviceSums
from .distributed import create_cluster
from .ema import EMA
from .errors import Interrupted, RunFailed, UserError
from .evaluate import evaluate, make_contexts
from .fileio import append_synced, atomic_write_text, remove_stale_temporaries
from .metrics import Accumulator, plot_curves, truncate_jsonl
from .optim_state import optimizer_state_arrays, restore_optimizer_state
from .plan import RunPlan, wants_serial_engine
from .precision import Precision
from .progress import Progress, StopFlag
from .protocol import Preprocess
from .records import derived_seeds
from .step import TrainStep, mix_batch, seed_everything
from .weights import load_named, named_params

__all__ = ["Trainer", "TrainState", "EpochResult"]

log = logging.getLogger("xception_mx.train")


@dataclass
class TrainState:
    """What ``Trainer.state()`` returns and ``restore()`` takes: the arrays of a checkpoint's state file
    (``param/``, ``optim/``, ``ema/``) and the counters and progress of its manifest."""
    arrays: dict
    info: dict  # epoch (complete epochs), best, optimizer (counters, layout), in_progress (mid-epoch or None)


@dataclass
class EpochResult:
    record: dict | None = None  # the epoch's training figures (complete epochs)
    in_progress: dict | None = None  # where a signal stopped it: batches done, running figures

    @property
    def interrupted(self) -> bool:
        return self.in_progress is not None


class Trainer:
    def __init__(self, plan: RunPlan):
        self.plan, self.config, self.folder = plan, plan.config, plan.folder
        config = self.config
        gpus = config["gpus"]
        if config["kv_store"] == "horovod" and len(gpus) > 1:  # one process per GPU: ours by local rank
            local = int(os.environ.get("HOROVOD_LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
            gpus = [gpus[local % len(gpus)]]
        self.ctx = make_contexts(gpus, config["cpus"])
        self.cluster = create_cluster(config["kv_store"], len(self.ctx))
        self.is_writer = self.cluster.rank == 0  # rank 0 alone writes checkpoints, metrics and curves
        self.local_batch = self.cluster.local_batch(config["batch_size"], len(self.ctx))
        if self.local_batch % (len(self.ctx) * config["accumulate"]):
            raise UserError(f"--batch-size {config['batch_size']} gives {self.local_batch} images per worker, which "
                            f"do not split into --accumulate {config['accumulate']} micro-batches over "
                            f"{len(self.ctx)} device(s): use a multiple of {len(self.ctx) * config['accumulate']}")
        self.batches_per_epoch = self._batches_per_epoch()
        seed_everything(config["seed"])
        self.precision = Precision(config["amp"], config["loss_scale_window"])  # before the network is built
        self.net = build_net(config)
        self.net.initialize(ctx=self.ctx)
        self.net.hybridize(static_alloc=True, static_shape=True)
        self.named = named_params(self.net)
        self.names = {p: n for n, p in self.named.items()}
        if config["no_wd_bn_bias"]:
            for name, p in self.named.items():
                if name.endswith((".gamma", ".beta", ".bias")):
                    p.wd_mult = 0.0
        if config["pretrained"] and plan.resume is None:  # a resume takes every weight from its checkpoint
            loaded = finetune.load_backbone(self.named, finetune.read_weights(config["pretrained"]))
            log.info("fine-tuning: %d feature parameters from %s, a new %d-way classifier", loaded,
                     config["pretrained"], config["num_classes"])
        schedule = build_schedule(config, plan.schedule, self.batches_per_epoch)
        self.trainer = self.cluster.make_trainer(self.net.collect_params(), config["optimizer"],
                                                 optimizer_params(config, schedule))
        self.precision.attach(self.trainer)
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=not self._dense_targets)
        self.step = TrainStep(self.net, self.trainer, self.loss_fn, self.ctx,
                              self.cluster.step_size(config["batch_size"]), config["accumulate"],
                              config["clip_grad_norm"], self.precision)
        self.ema = EMA(self.named, config["ema"], self.ctx[0]) if config["ema"] > 0 else None
        self.epoch, self.best, self.in_progress = 0, {"epoch": None, "val_top1": None}, None
        self.grad_norm = None  # the last update's gradient norm (device array) when clipping
        self.board = Board(None)
        if plan.resume is not None:
            epoch = None if plan.resume.partial else plan.resume.epoch
            self.restore(TrainState(load_state(self.folder, epoch, plan.resume.manifest), plan.resume.manifest))
            if plan.retrain:
                self.in_progress = None
        if self.cluster.distributed:  # every worker starts from rank 0's (initial or loaded) weights
            self.cluster.sync_initial(self.trainer, self.net.collect_params())

    @property
    def _dense_targets(self) -> bool:
        return bool(self.config["label_smoothing"] or self.config["mixup"])

    def _batches_per_epoch(self) -> int:
        batches = data.num_train_batches(self.plan.shards.train, self.local_batch, num_parts=self.cluster.size)
        if batches < 1:
            raise UserError(f"the training shards hold {data.count_records(self.plan.shards.train)} images, fewer "
                            f"than one batch of {self.local_batch} per worker ({self.cluster.size} worker(s)): "
                            f"lower --batch-size")
        return min(batches, self.config["max_batches"] or batches)

    # ------------------------------------------------------------------------------------------------- state

    def state(self) -> TrainState:
        """Weights, optimizer state and counters, EMA, the loss scaler (float16), completed epochs, best epoch and
        mid-epoch progress."""
        ctx = self.ctx[0]
        arrays = {f"param/{n}": p.data(ctx) for n, p in self.named.items()}
        if self.ema is not None:
            arrays.update({f"ema/{n}": a for n, a in self.ema.arrays().items()})
        optim_arrays, optim_info = optimizer_state_arrays(self.trainer, self.names)
        arrays.update(optim_arrays)
        info = {"epoch": self.epoch, "best": dict(self.best), "optimizer": optim_info, "amp": self.precision.state()}
        if self.in_progress is not None:
            info["in_progress"] = dict(self.in_progress)
        return TrainState(arrays, info)

    def restore(self, state: TrainState) -> None:
        """The inverse of :meth:`state`."""
        arrays, info = state.arrays, state.info
        weights = _strip(arrays, "param/")
        load_named(self.named, weights, "the checkpoint")
        restore_optimizer_state(self.trainer, self.names, info["optimizer"], arrays)
        if self.ema is not None:
            self.ema.load(_strip(arrays, "ema/") or weights)
        self.epoch = int(info["epoch"])
        self.best = dict(info.get("best") or {"epoch": None, "val_top1": None})
        self.in_progress = info.get("in_progress")
        if info.get("config", {}).get("amp", self.config["amp"]) == self.config["amp"]:  # a retrain may switch
            self.precision.restore(info.get("amp"))

    def _save(self, epoch: int | None, record: dict | None = None) -> None:
        """Write the state and its manifest (epoch None: the mid-epoch checkpoint); rank 0 only."""
        self.board.flush()  # the event files hold at least what the checkpoint does
        state = self.state()
        manifest = {"format": 1, **state.info, "config": self.config, "schedule": self.plan.schedule,
                    "metrics": record, "mxnet": mx.__version__, "prefix": self.folder.prefix,
                    "engine": os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice")}
        save_checkpoint(self.folder, epoch, state.arrays, manifest)

    # -------------------------------------------------------------------------------------------------- loop

    def fit(self) -> dict | None:
        """Train epochs ``start + 1 .. num_epochs`` holding the run folder's lock (rank 0). Returns the last epoch's
        metrics record."""
        os.makedirs(self.folder.folder, exist_ok=True)
        with self.folder.lock() if self.is_writer else contextlib.nullcontext():
            self._start()
            try:
                return self._epochs()
            except KeyboardInterrupt:  # a second signal: StopFlag gives up waiting for the step
                raise Interrupted(f"stopped at once by a second signal: the step in progress and its mid-epoch "
                                  f"checkpoint were discarded; {self.folder.resume_hint()}") from None
            finally:
                self.board.close()

    @property
    def updates(self) -> int:
        """Optimizer updates so far (restored exactly on resume): the TensorBoard step axis."""
        return int(self.trainer.optimizer.num_update)

    def _epochs(self) -> dict | None:
        record = None
        with StopFlag() as stop:
            for epoch in range(self.epoch + 1, self.config["num_epochs"] + 1):
                result = self.train_epoch(epoch, stop)
                if self.cluster.distributed:
                    self.cluster.sync_workers(self.named, self.ema and self.ema.shadow, self.ctx[0], self.trainer)
                if result.interrupted:
                    self.in_progress = result.in_progress
                    if self.is_writer:
                        self._save(None)
                    raise Interrupted(self._stopped(stop, epoch, result.in_progress["batches_done"]))
                record = self._finish_epoch(epoch, result.record)
                if self.cluster.vote(stop)[0]:
                    raise Interrupted(self._stopped(stop, epoch, None))
        if self.cluster.distributed:
            self.cluster.barrier()
        log.info("done: best val top-1 %.4f at epoch %s; checkpoints in %s", self.best["val_top1"] or 0,
                 self.best["epoch"], self.folder.folder)
        return record

    def _start(self) -> None:
        config, folder = self.config, self.folder
        log_to_file(folder.path("train.log" if self.is_writer else f"train.rank{self.cluster.rank}.log"))
        if self.is_writer:
            self._claim_folder()
        if wants_serial_engine(config) and os.environ.get("MXNET_ENGINE_TYPE") != "NaiveEngine":
            log.warning("deterministic=%s but MXNet runs another engine than NaiveEngine: results will differ in "
                        "the last bits from run to run (apache/mxnet#13829); set MXNET_ENGINE_TYPE=NaiveEngine "
                        "before importing mxnet, as train_xception.py does", config["deterministic"])
        if self.is_writer:
            with disk_errors(folder.folder, "the run's config"):
                dump_yaml(config, folder.config_yaml)
                Preprocess.from_config(config).write(folder.model_prefix)
                truncate_jsonl(folder.metrics, self.epoch)
            if config["tensorboard"]:
                self.board = Board(config["tensorboard"], yaml.safe_dump(config, sort_keys=False),
                                   resumed_at=self.updates if self.plan.resume is not None else None)
        if self.plan.resume is not None:
            where = (f"epoch {self.epoch + 1}, batch {self.in_progress['batches_done']}" if self.in_progress
                     else f"the end of epoch {self.epoch}")
            if self.plan.retrain:
                log.info("retraining from epoch %d with a new schedule starting at lr %g", self.epoch, config["lr"])
            else:
                log.info("resuming from %s of %s", where, folder.folder)
        log.info("training %s (%s) on %s, global batch %d (%d per device), %d batches/epoch, epochs %d..%d",
                 config["model"], self.net.describe(), ",".join(map(str, self.ctx)),
                 config["batch_size"], self.local_batch // len(self.ctx), self.batches_per_epoch, self.epoch + 1,
                 config["num_epochs"])
        for note in self.plan.notes:
            log.info("%s", note)
        if self.cluster.distributed:
            log.info("%s: worker %d of %d, %d images per step on this worker", self.cluster.engine,
                     self.cluster.rank, self.cluster.size, self.local_batch)

    def _claim_folder(self) -> None:
        """Under the lock: refuse a fresh run into another run's folder (again: one may have started since the plan),
        remove temporary files a killed run left, and move what a retrain branches away from."""
        if self.plan.resume is None:
            self.folder.refuse_fresh_run()
        removed = remove_stale_temporaries(self.folder.folder)
        if removed:
            log.info("removed %d temporary file(s) a stopped run left in %s", len(removed), self.folder.folder)
        if self.plan.retrain:
            moved_to = self.folder.branch_after(self.epoch)
            if moved_to:
                log.info("retrain branches at epoch %d: the original run's later checkpoints and metrics moved to %s",
                         self.epoch, moved_to)

    def _save_recovery(self, in_progress: dict) -> None:
        """A mid-epoch checkpoint every --checkpoint-interval minutes: what a SIGKILL or a lost node then costs."""
        if self.cluster.distributed:
            self.cluster.sync_workers(self.named, self.ema and self.ema.shadow, self.ctx[0], self.trainer)
        self.in_progress = in_progress
        if self.is_writer:
            self._save(None)
            log.info("recovery checkpoint: epoch %d, batch %d", in_progress["epoch"], in_progress["batches_done"])

    def _finish_epoch(self, epoch: int, record: dict) -> dict:
        """Validate (with the EMA weights when on), then metrics, export, state and manifest (rank 0)."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            record.update(self.validate())
            if self.is_writer:
                with disk_errors(self.folder.folder, f"the export of epoch {epoch}"):
                    append_synced(self.folder.metrics, json.dumps(record) + "\n")
                    export_atomic(self.net, self.folder.model_prefix, epoch)
                    if self.config["softmax_head"]:
                        from .deploy import add_softmax_head

                        prefix = self.folder.model_prefix
                        add_softmax_head(prefix, epoch, f"{prefix}-softmax", epoch, check=False)
        self.epoch, self.in_progress = epoch, None
        if self.best["val_top1"] is None or record["val_top1"] > self.best["val_top1"]:
            self.best = dict(record)
        if self.is_writer:
            self.board.scalars(self.updates, {f"epoch/{k}": v for k, v in record.items()})
            self._save(epoch, record)
            self.folder.remove(None)  # a mid-epoch checkpoint is now stale
            self.folder.prune(epoch, self.config["keep_last"], self.best["epoch"])
            with disk_errors(self.folder.folder, "best.json and curves.png"):
                atomic_write_text(self.folder.best, json.dumps(self.best, indent=1, sort_keys=True))
                plot_curves(self.folder.metrics, self.folder.curves)
        log.info("epoch %d: train loss %.4f top-1 %.4f | val loss %.4f top-1 %.4f top-5 %.4f | %.1f img/s, %.1fs, "
                 "lr %.4g", epoch, record["train_loss"], record["train_top1"], record["val_loss"], record["val_top1"],
                 record["val_top5"], record["samples_per_sec"], record["time_s"], record["lr"])
        return record

    def _stopped(self, stop: StopFlag, epoch: int, batches_done: int | None) -> str:
        where = f"in epoch {epoch} after batch {batches_done}" if batches_done is not None else f"after epoch {epoch}"
        return (f"stopped by {stop.name} {where}; checkpoint saved. Resume with: train_xception.py --output-dir "
                f"{self.folder.folder} --resume")

    def train_epoch(self, epoch: int, stop: StopFlag) -> EpochResult:
        """One epoch of this worker's part; a mid-epoch ``in_progress`` skips the batches already trained on.

        The running figures stay on the devices (:class:`DeviceSums`): the host reads them every --log-interval
        updates, at a checkpoint and at the end, and checks the loss is finite then.
        """
        config, cluster = self.config, self.cluster
        frozen = epoch <= config["freeze_features_epochs"]
        finetune.set_features_lr_mult(self.named, 0.0 if frozen else config["features_lr_mult"])
        main_seed, mix_seed = derived_seeds(config["seed"], epoch, n=2)
        seed_everything(main_seed)
        mix_rng = np.random.RandomState(mix_seed)
        resumed = self.in_progress or {}
        skip = resumed.get("batches_done", 0)
        # A mid-epoch checkpoint holds the figures summed over the workers: rank 0 carries them on.
        acc = Accumulator.from_dict(resumed["acc"]) if resumed and cluster.rank == 0 else Accumulator()
        sums = DeviceSums(self.ctx, config["num_classes"])
        first_lr = resumed.get("first_lr")
        progress = Progress(epoch, self.batches_per_epoch, config["batch_size"], config["log_interval"], skip)
        start, done, synced = time.time(), skip, skip
        interval, last_save = config["checkpoint_interval"] * 60, time.time()
        for i, batch in enumerate(train_data(config, self.plan.shards.train, self.local_batch, epoch,
                                                        self.cluster.size, self.cluster.rank)):
            if i >= self.batches_per_epoch:
                break
            if i < skip:  # trained on before the interruption: keep the data order and the mixup draws
                if config["mixup"] > 0:
                    mix_rng.beta(config["mixup"], config["mixup"])
                continue
            self._train_batch(batch, mix_rng, sums)
            first_lr = first_lr if first_lr is not None else self.trainer.learning_rate
            done = i + 1
            if done % config["log_interval"] == 0 or done == self.batches_per_epoch:
                self._sync(sums, acc, epoch, synced, done)
                synced = done
                norm = self._read_grad_norm()
                progress.update(self.trainer.learning_rate, acc, norm)
                self.board.scalars(self.updates, {
                    "train/loss": acc.loss, "train/top1": acc.top(1), "train/lr": self.trainer.learning_rate,
                    "train/img_per_sec": progress.rate, "train/loss_scale": self.precision.loss_scale,
                    "train/grad_norm": norm})
            else:
                progress.update(self.trainer.learning_rate)
            if done == self.batches_per_epoch:
                continue
            stopping, due = cluster.vote(stop, bool(interval) and time.time() - last_save >= interval)
            if stopping or due:
                self._sync(sums, acc, epoch, synced, done)
                synced = done
                in_progress = {"epoch": epoch, "batches_done": done, "acc": cluster.sum_accumulator(acc).to_dict(),
                               "first_lr": first_lr, "elapsed": resumed.get("elapsed", 0.0) + time.time() - start}
                if stopping:
                    progress.close()
                    return EpochResult(in_progress=in_progress)
                self._save_recovery(in_progress)
                last_save = time.time()
        progress.close()
        acc = cluster.sum_accumulator(acc)  # the epoch's training figures over every worker's part
        if done < self.batches_per_epoch:
            raise UserError(f"the training iterator gave {done} batches, {self.batches_per_epoch} were expected: "
                            f"check the shards with `im2rec-tools verify`")
        elapsed = resumed.get("elapsed", 0.0) + time.time() - start
        return EpochResult(record={
            "epoch": epoch, "lr": first_lr, "train_loss": acc.loss, "train_top1": acc.top(1), "val_loss": None,
            "val_top1": None, "val_top5": None, "samples_per_sec": acc.count / max(elapsed, 1e-9), "time_s": elapsed})

    def _train_batch(self, batch, mix_rng: np.random.RandomState, sums: DeviceSums) -> None:
        """One update (labels were checked at start, from the record headers); nothing is read back here."""
        config = self.config
        x, labels = batch.data[0], batch.label[0]
        target = labels
        if self._dense_targets:
            x, target = mix_batch(x, labels, config["num_classes"], config["mixup"], config["label_smoothing"],
                                  mix_rng)
        out = self.step(x, target, labels)
        self.grad_norm = out.grad_norm
        if self.ema is not None:
            self.ema.update()
        sums.add(out.outputs, out.losses, out.labels)

    def _sync(self, sums: DeviceSums, acc: Accumulator, epoch: int, first: int, last: int) -> None:
        """Read the running figures back (a host wait) and stop on a non-finite loss."""
        sums.drain(acc)
        if DeviceSums.finite(acc):
            return
        latest = self.folder.latest()
        where = (f"the last good checkpoint is epoch {latest} in {self.folder.folder} (resume with --resume "
                 f"{latest} and a lower --lr, or --retrain)" if latest else "no checkpoint was written yet")
        raise RunFailed(f"loss is not finite at epoch {epoch}, batches {first + 1}..{last}: {where}")

    def _read_grad_norm(self) -> float | None:
        return None if self.grad_norm is None else float(self.grad_norm.asnumpy()[0])

    def validate(self) -> dict:
        """Each worker scores its part of the validation shards; the counts are summed over the workers."""
        config = self.config
        batches = val_data(config, self.plan.shards.val, self.local_batch, self.cluster.size, self.cluster.rank)
        acc = self.cluster.sum_accumulator(evaluate(self.net, batches, self.ctx, config["num_classes"]))
        return {"val_loss": acc.loss, "val_top1": acc.top(1), "val_top5": acc.top(5)}


def _strip(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
