"""The Trainer: built from a ``RunPlan``; ``fit()`` is the epoch loop, ``state()``/``restore()`` one symmetric pair.

Exactness: epoch k's randomness (data order, augmentation, dropout, mixup) is seeded from (seed, k) alone, and
``state()`` holds the weights, BN statistics, optimizer states and counters, EMA weights and progress bit for bit,
so a run resumed at an epoch boundary reproduces an uninterrupted one exactly (on CPU; cuDNN may pick
non-deterministic kernels on GPUs). A SIGINT/SIGTERM checkpoint taken mid-epoch resumes with the same data order.
What is written, and when, is the writer's (``writer.py``): the loop asks it to persist.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
from mxnet import gluon

from . import data, finetune
from .builders import build_net, build_schedule, optimizer_params, train_data, val_data
from .checkpoint import load_state
from .config import upgrade_saved
from .console import log_to_file
from .device_metrics import DeviceSums
from .distributed import create_cluster
from .ema import EMA
from .errors import Interrupted, RunFailed, UserError
from .evaluate import evaluate, make_contexts
from .manifest import EpochRecord, InProgress, TrainProgress
from .metrics import Accumulator, resident_mib
from .optim_state import optimizer_state_arrays, restore_optimizer_state
from .padding import ChannelLayout
from .plan import ResumePoint, RunPlan, wants_serial_engine
from .precision import Precision
from .progress import Progress, StopFlag, lr_range
from .records import derived_seeds
from .step import TrainStep, mix_batch, seed_everything
from .weights import load_named, named_params
from .writer import TrainState, make_writer

__all__ = ["Trainer", "TrainState", "EpochResult"]

log = logging.getLogger("xception_mx.train")


@dataclass
class EpochResult:
    record: EpochRecord | None = None  # the epoch's training figures (complete epochs)
    in_progress: InProgress | None = None  # where a signal stopped it: batches done, running figures
    lr_steps: list[tuple[int, float]] = field(default_factory=list)  # (update, lr) at the log interval

    @property
    def interrupted(self) -> bool:
        return self.in_progress is not None


class Trainer:
    def __init__(self, plan: RunPlan):
        self.plan, self.config, self.folder = plan, plan.config, plan.folder
        config = self.config
        gpus = list(config.gpus)
        if config.kv_store == "horovod" and len(gpus) > 1:  # one process per GPU: ours by local rank
            local = int(os.environ.get("HOROVOD_LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
            gpus = [gpus[local % len(gpus)]]
        self.ctx = make_contexts(gpus, config.cpus)
        self.cluster = create_cluster(config.kv_store, len(self.ctx))
        self.writer = make_writer(plan, self.cluster.rank)  # rank 0 writes the run; the others write nothing
        self.local_batch = self.cluster.local_batch(config.batch_size, len(self.ctx))
        if self.local_batch % (len(self.ctx) * config.accumulate):
            raise UserError(f"--batch-size {config.batch_size} gives {self.local_batch} images per worker, which "
                            f"do not split into --accumulate {config.accumulate} micro-batches over "
                            f"{len(self.ctx)} device(s): use a multiple of {len(self.ctx) * config.accumulate}")
        self.batches_per_epoch = self._batches_per_epoch()
        seed_everything(config.seed)
        self.precision = Precision(config.amp, config.loss_scale_window)  # before the network is built
        self._build_network()
        schedule = build_schedule(config, plan.schedule, self.batches_per_epoch)
        self.trainer = self.cluster.make_trainer(self.net.collect_params(), config.optimizer,
                                                 optimizer_params(config, schedule))
        self.precision.attach(self.trainer)
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=not self._dense_targets)
        self.step = TrainStep(self.net, self.trainer, self.loss_fn, self.ctx,
                              self.cluster.step_size(config.batch_size), config.accumulate,
                              config.clip_grad_norm, self.precision)
        self.ema = EMA(self.named, config.ema, self.ctx[0]) if config.ema > 0 else None
        self.epoch: int = 0
        self.best: EpochRecord | None = None
        self.in_progress: InProgress | None = None
        self.grad_norm = None  # the last update's gradient norm (device array) when clipping
        if plan.resume is not None:
            self._load(plan.resume)
        if self.cluster.distributed:  # every worker starts from rank 0's (initial or loaded) weights
            self.cluster.sync_initial(self.trainer, self.net.collect_params())

    def _build_network(self) -> None:
        """The network on the devices, hybridized, with weight decay and fine-tuning settings applied."""
        config = self.config
        self.net = build_net(config, self.plan.channel_multiple)
        self.net.initialize(ctx=self.ctx)  # the added channels of padded widths start (and stay) zero
        self.layout = ChannelLayout.of(self.net)
        self.net.hybridize(static_alloc=True, static_shape=True)
        self.named = named_params(self.net)
        self.names = {p: n for n, p in self.named.items()}
        if config.no_wd_bn_bias:
            for name, p in self.named.items():
                if name.endswith((".gamma", ".beta", ".bias")):
                    p.wd_mult = 0.0
        if config.pretrained and self.plan.resume is None:  # a resume takes every weight from its checkpoint
            weights = self.layout.to_padded(finetune.read_weights(config.pretrained))
            loaded = finetune.load_backbone(self.named, weights)
            log.info("fine-tuning: %d feature parameters from %s, a new %d-way classifier", loaded,
                     config.pretrained, config.num_classes)

    def _load(self, point: ResumePoint) -> None:
        """Restore the checkpoint a resume continues (or a retrain branches from: no mid-epoch position, and the
        loss scaler only when the precision stays)."""
        progress = point.manifest.progress
        if self.plan.retrain:
            saved_amp = upgrade_saved(point.manifest.config).get("amp", self.config.amp)
            progress = dataclasses.replace(progress, in_progress=None,
                                           amp=progress.amp if saved_amp == self.config.amp else None)
        arrays = load_state(self.folder, None if point.partial else point.epoch, point.manifest)
        self.restore(TrainState(arrays, progress))

    @property
    def _dense_targets(self) -> bool:
        return bool(self.config.label_smoothing or self.config.mixup)

    def _batches_per_epoch(self) -> int:
        batches = data.num_train_batches(self.plan.shards.train, self.local_batch, num_parts=self.cluster.size)
        if batches < 1:
            raise UserError(f"the training shards hold {data.count_records(self.plan.shards.train)} images, fewer "
                            f"than one batch of {self.local_batch} per worker ({self.cluster.size} worker(s)): "
                            f"lower --batch-size")
        return min(batches, self.config.max_batches or batches)

    # ------------------------------------------------------------------------------------------------- state

    def state(self) -> TrainState:
        """Weights, optimizer state and counters, EMA, the loss scaler (float16), completed epochs, best epoch and
        mid-epoch progress; every array in the paper's shape, whatever ``channel_multiple`` computes with."""
        self.net.zero_added_channels(statistics_only=True)  # what oneDNN's BatchNorm leaves in a zero channel
        if self.ema is not None:
            self.layout.zero_added(self.ema.shadow, statistics_only=True)
        ctx = self.ctx[0]
        arrays = {f"param/{n}": p.data(ctx) for n, p in self.named.items()}
        if self.ema is not None:
            arrays.update({f"ema/{n}": a for n, a in self.ema.arrays().items()})
        optim_arrays, optim_info = optimizer_state_arrays(self.trainer, self.names)
        arrays.update(optim_arrays)
        progress = TrainProgress(self.epoch, self.best, optim_info, self.precision.state(), self.in_progress)
        return TrainState(self.layout.to_canonical(arrays), progress)

    def restore(self, state: TrainState) -> None:
        """The inverse of :meth:`state`."""
        arrays, progress = self.layout.to_padded(state.arrays), state.progress
        weights = _strip(arrays, "param/")
        load_named(self.named, weights, "the checkpoint")
        restore_optimizer_state(self.trainer, self.names, progress.optimizer, arrays)
        if self.ema is not None:
            self.ema.load(_strip(arrays, "ema/") or weights)
        self.epoch, self.best, self.in_progress = progress.epoch, progress.best, progress.in_progress
        self.precision.restore(progress.amp)

    # -------------------------------------------------------------------------------------------------- loop

    def fit(self) -> EpochRecord | None:
        """Train epochs ``start + 1 .. num_epochs`` (rank 0 holding the run folder's lock). Returns the last
        epoch's figures."""
        with self.writer.claim():
            log_to_file(self.writer.log_file)
            self.writer.start(self.updates)
            self._log_start()
            try:
                return self._epochs()
            except KeyboardInterrupt:  # a second signal: StopFlag gives up waiting for the step
                raise Interrupted(f"stopped at once by a second signal: the step in progress and its mid-epoch "
                                  f"checkpoint were discarded; {self.folder.resume_hint()}") from None

    @property
    def updates(self) -> int:
        """Optimizer updates so far (restored exactly on resume): the TensorBoard step axis."""
        return int(self.trainer.optimizer.num_update)

    def _epochs(self) -> EpochRecord | None:
        record = None
        with StopFlag() as stop:
            for epoch in range(self.epoch + 1, self.config.num_epochs + 1):
                result = self.train_epoch(epoch, stop)
                if self.cluster.distributed:
                    self.cluster.sync_workers(self.named, self._ema_shadow(), self.ctx[0], self.trainer)
                if result.in_progress is not None:
                    self.in_progress = result.in_progress
                    self.writer.save_stopped(self.state())
                    raise Interrupted(self._stopped(stop, epoch, result.in_progress.batches_done))
                assert result.record is not None
                record = self._finish_epoch(epoch, result.record, result.lr_steps)
                if self.cluster.vote(stop)[0]:
                    raise Interrupted(self._stopped(stop, epoch, None))
        if self.cluster.distributed:
            self.cluster.barrier()
        log.info("done: best val top-1 %.4f at epoch %s; checkpoints in %s",
                 (self.best.val_top1 if self.best else None) or 0, self.best.epoch if self.best else None,
                 self.folder.folder)
        return record

    def _log_start(self) -> None:
        config, folder = self.config, self.folder
        if wants_serial_engine(config) and os.environ.get("MXNET_ENGINE_TYPE") != "NaiveEngine":
            log.warning("deterministic=%s but MXNet runs another engine than NaiveEngine: results will differ in "
                        "the last bits from run to run (apache/mxnet#13829); set MXNET_ENGINE_TYPE=NaiveEngine "
                        "before importing mxnet, as train_xception.py does", config.deterministic)
        if self.plan.resume is not None:
            where = (f"epoch {self.epoch + 1}, batch {self.in_progress.batches_done}" if self.in_progress
                     else f"the end of epoch {self.epoch}")
            if self.plan.retrain:
                log.info("retraining from epoch %d with a new schedule starting at lr %g", self.epoch, config.lr)
            else:
                log.info("resuming from %s of %s", where, folder.folder)
        log.info("training %s (%s) on %s, global batch %d (%d per device), %d batches/epoch, epochs %d..%d",
                 config.model, self.net.describe(), ",".join(map(str, self.ctx)),
                 config.batch_size, self.local_batch // len(self.ctx), self.batches_per_epoch, self.epoch + 1,
                 config.num_epochs)
        for note in self.plan.notes:
            log.info("%s", note)
        if self.cluster.distributed:
            log.info("%s: worker %d of %d, %d images per step on this worker", self.cluster.engine,
                     self.cluster.rank, self.cluster.size, self.local_batch)

    def _save_recovery(self, in_progress: InProgress) -> None:
        """A mid-epoch checkpoint every --checkpoint-interval minutes: what a SIGKILL or a lost node then costs."""
        if self.cluster.distributed:
            self.cluster.sync_workers(self.named, self._ema_shadow(), self.ctx[0], self.trainer)
        self.in_progress = in_progress
        self.writer.save_recovery(self.state())

    def _ema_shadow(self) -> dict | None:
        return self.ema.shadow if self.ema is not None else None

    def _evaluation_weights(self) -> contextlib.AbstractContextManager:
        """The EMA weights swapped in for validation and the export, when EMA is on."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _finish_epoch(self, epoch: int, record: EpochRecord, lr_steps: list | None = None) -> EpochRecord:
        """Validate and export (with the EMA weights when on), then the checkpoint and figures (the writer's);
        ``lr_steps``: the epoch's (update, lr) at the log interval."""
        with self._evaluation_weights():
            record = dataclasses.replace(record, **self.validate(), rss_mib=resident_mib())
            self.writer.export(epoch, self.net)
        self.epoch, self.in_progress = epoch, None
        if self.best is None or (record.val_top1 or 0) > (self.best.val_top1 or 0):
            self.best = record
        self.writer.save_epoch(self.state(), record, lr_steps)
        log.info("epoch %d: train loss %.4f top-1 %.4f | val loss %.4f top-1 %.4f top-5 %.4f | %.1f img/s, %.1fs, "
                 "lr %s", epoch, record.train_loss, record.train_top1, record.val_loss, record.val_top1,
                 record.val_top5, record.samples_per_sec, record.time_s,
                 lr_range(record.lr, lr_steps[-1][1] if lr_steps else None))
        return record

    def _stopped(self, stop: StopFlag, epoch: int, batches_done: int | None) -> str:
        where = f"in epoch {epoch} after batch {batches_done}" if batches_done is not None else f"after epoch {epoch}"
        return f"stopped by {stop.name} {where}; checkpoint saved. Resume with: {self.folder.resume_command()}"

    def train_epoch(self, epoch: int, stop: StopFlag) -> EpochResult:
        """One epoch of this worker's part; a mid-epoch ``in_progress`` skips the batches already trained on.

        The running figures stay on the devices (:class:`DeviceSums`): the host reads them every --log-interval
        updates, at a checkpoint and at the end, and checks the loss is finite then.
        """
        config = self.config
        finetune.set_features_lr_mult(self.named, 0.0 if epoch <= config.freeze_features_epochs
                                      else config.features_lr_mult)
        main_seed, mix_seed = derived_seeds(config.seed, epoch, n=2)
        seed_everything(main_seed)
        mix_rng = np.random.RandomState(mix_seed)
        run = _EpochRun(epoch, self.in_progress, self.cluster.rank, DeviceSums(self.ctx, config.num_classes),
                        Progress(epoch, self.batches_per_epoch, config.batch_size, config.log_interval,
                                 self.in_progress.batches_done if self.in_progress else 0))
        interval, last_save = config.checkpoint_interval * 60, time.time()
        batches = train_data(config, self.plan.shards.train, self.local_batch, epoch, self.cluster.size,
                             self.cluster.rank)
        for i, batch in enumerate(run.progress.timed(batches)):
            if i >= self.batches_per_epoch:
                break
            if i < run.skip:  # trained on before the interruption: keep the data order and the mixup draws
                if config.mixup > 0:
                    mix_rng.beta(config.mixup, config.mixup)
                continue
            self._train_batch(batch, mix_rng, run.sums)
            run.batch_done(i + 1, self.trainer.learning_rate)
            self._report(run)
            if run.done == self.batches_per_epoch:
                continue
            stopping, due = self.cluster.vote(stop, bool(interval) and time.time() - last_save >= interval)
            if stopping or due:
                in_progress = self._position(run)
                if stopping:
                    run.progress.close()
                    return EpochResult(in_progress=in_progress)
                self._save_recovery(in_progress)
                last_save = time.time()
        return EpochResult(record=self._epoch_record(run), lr_steps=run.lr_steps)

    def _report(self, run: _EpochRun) -> None:
        """The progress line; at the log interval also the figures read back from the devices, and TensorBoard."""
        lr = self.trainer.learning_rate
        if run.done % self.config.log_interval and run.done != self.batches_per_epoch:
            if not run.lr_steps:  # the schedule's curve starts at the epoch's first step
                run.lr_steps.append((self.updates, lr))
            run.progress.update(lr)
            return
        run.lr_steps.append((self.updates, lr))
        self._sync(run)
        norm = None if self.grad_norm is None else float(self.grad_norm.asnumpy()[0])
        run.progress.update(lr, run.acc, norm)
        self.writer.scalars(self.updates, {
            "train/loss": run.acc.loss, "train/top1": run.acc.top(1), "train/lr": lr,
            "train/img_per_sec": run.progress.rate, "train/loss_scale": self.precision.loss_scale,
            "train/grad_norm": norm})

    def _position(self, run: _EpochRun) -> InProgress:
        """Where the epoch stands, with its figures summed over the workers: a mid-epoch checkpoint's position."""
        self._sync(run)
        return InProgress(run.epoch, run.done, self.cluster.sum_accumulator(run.acc).to_dict(), run.first_lr,
                          run.elapsed())

    def _epoch_record(self, run: _EpochRun) -> EpochRecord:
        run.progress.close()
        acc = self.cluster.sum_accumulator(run.acc)  # the epoch's training figures over every worker's part
        if run.done < self.batches_per_epoch:
            raise UserError(f"the training iterator gave {run.done} batches, {self.batches_per_epoch} were expected: "
                            f"check the shards with `im2rec-tools verify`")
        elapsed = run.elapsed()
        return EpochRecord(run.epoch, run.first_lr, acc.loss, acc.top(1),
                           samples_per_sec=acc.count / max(elapsed, 1e-9), time_s=elapsed)

    def _train_batch(self, batch, mix_rng: np.random.RandomState, sums: DeviceSums) -> None:
        """One update (labels were checked at start, from the record headers); nothing is read back here."""
        config = self.config
        x, labels = batch.data[0], batch.label[0]
        target = labels
        if self._dense_targets:
            x, target = mix_batch(x, labels, config.num_classes, config.mixup, config.label_smoothing, mix_rng)
        out = self.step(x, target, labels)
        self.grad_norm = out.grad_norm
        if self.ema is not None:
            self.ema.update()
        sums.add(out.outputs, out.losses, out.labels)

    def _sync(self, run: _EpochRun) -> None:
        """Read the running figures back (a host wait) and stop on a non-finite loss."""
        first, last = run.synced, run.done
        run.sums.drain(run.acc)
        run.synced = run.done
        if DeviceSums.finite(run.acc):
            return
        latest = self.folder.latest()
        where = (f"the last good checkpoint is epoch {latest} in {self.folder.folder} (resume with --resume "
                 f"{latest} and a lower --lr, or --retrain)" if latest else "no checkpoint was written yet")
        raise RunFailed(f"loss is not finite at epoch {run.epoch}, batches {first + 1}..{last}: {where}")

    def validate(self) -> dict:
        """Each worker scores its part of the validation shards; the counts are summed over the workers."""
        batches = val_data(self.config, self.plan.shards.val, self.local_batch, self.cluster.size, self.cluster.rank)
        acc = self.cluster.sum_accumulator(evaluate(self.net, batches, self.ctx, self.config.num_classes))
        return {"val_loss": acc.loss, "val_top1": acc.top(1), "val_top5": acc.top(5)}


class _EpochRun:
    """One epoch's running position: batches done and read back, figures, the first lr, the time taken (a
    resumed epoch carries on the figures and time of the mid-epoch checkpoint; rank 0 carries the figures, which
    the checkpoint holds summed over the workers)."""

    def __init__(self, epoch: int, resumed: InProgress | None, rank: int, sums: DeviceSums, progress: Progress):
        self.epoch, self.sums, self.progress = epoch, sums, progress
        self.skip = self.done = self.synced = resumed.batches_done if resumed else 0
        self.acc = Accumulator.from_dict(resumed.acc) if resumed and rank == 0 else Accumulator()
        self.first_lr = resumed.first_lr if resumed else None
        self.lr_steps: list[tuple[int, float]] = []  # (update, lr) at the first step and the log interval
        self._before, self._start = (resumed.elapsed if resumed else 0.0), time.time()

    def batch_done(self, done: int, lr: float) -> None:
        self.done = done
        if self.first_lr is None:
            self.first_lr = lr

    def elapsed(self) -> float:
        return self._before + time.time() - self._start


def _strip(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
