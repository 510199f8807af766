"""Everything rank 0 writes during a run, in one place and one order; other ranks get a writer that writes nothing.

The order, which is what makes a crash at any point cost at most the step or epoch in progress:

1. ``claim()``: the folder's lock, held for the whole run.
2. ``start()``: a fresh run refuses another run's folder; temporary files a killed run left go; a retrain moves the
   branch it leaves into ``before-retrain-from-EEEE-<time>/``; then ``config.yaml``, the protocol
   (``PREFIX-preprocess.json``), ``classes.txt`` (the training data's), ``metrics.jsonl`` cut back to the resumed
   epoch (and the resumed epoch's line restored from its manifest when a crash lost it), TensorBoard.
3. ``scalars()``: TensorBoard scalars at the log interval.
4. ``save_recovery()``/``save_stopped()``: a mid-epoch checkpoint (every ``--checkpoint-interval`` minutes, or a
   signal's).
5. At an epoch's end: ``export()`` (with the evaluation weights: EMA when on; and the SoftmaxOutput head), then
   ``save_epoch()``: state arrays, manifest (so the checkpoint is complete), then the epoch's ``metrics.jsonl``
   line (with the lr at each log interval), the now stale mid-epoch checkpoint removed, pruning, ``best.json``,
   ``curves.png``.

A metrics line therefore exists only for an epoch whose checkpoint is complete. Failed writes (disk full) are one
line naming the folder and its free space (``checkpoint.disk_errors``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import mxnet as mx
from mxnet import gluon

from .board import Board
from .checkpoint import disk_errors, export_atomic, save_state
from .config import config_text, dump_yaml
from .fileio import append_synced, atomic_write_text, remove_stale_temporaries
from .manifest import EpochRecord, Manifest, TrainProgress
from .metrics import plot_curves, read_jsonl, truncate_jsonl
from .padding import canonical_export
from .plan import RunPlan
from .protocol import Preprocess
from .records import read_classes
from .runfolder import write_classes

__all__ = ["TrainState", "NullWriter", "RunWriter", "make_writer"]

log = logging.getLogger("xception_mx.writer")


@dataclass
class TrainState:
    """What ``Trainer.state()`` returns and ``restore()`` takes: the arrays of a checkpoint's state file
    (``param/``, ``optim/``, ``ema/``, by structured name) and the trainer's counters."""
    arrays: dict[str, mx.nd.NDArray]
    progress: TrainProgress


class NullWriter:
    """The writer of ranks other than 0: every call writes nothing (each rank keeps its own log file)."""

    def __init__(self, plan: RunPlan, rank: int = 0):
        self.plan, self.folder, self.rank = plan, plan.folder, rank

    @property
    def log_file(self) -> str:
        return self.folder.path(f"train.rank{self.rank}.log")

    def claim(self) -> contextlib.AbstractContextManager:
        os.makedirs(self.folder.folder, exist_ok=True)  # for this rank's log file
        return contextlib.nullcontext()

    def start(self, resumed_updates: int) -> None:
        pass

    def scalars(self, step: int, values: dict) -> None:
        pass

    def save_recovery(self, state: TrainState) -> None:
        pass

    def save_stopped(self, state: TrainState) -> None:
        pass

    def export(self, epoch: int, net: gluon.HybridBlock) -> None:
        pass

    def save_epoch(self, state: TrainState, record: EpochRecord, lr_steps: list | None = None) -> None:
        pass


class RunWriter(NullWriter):
    """Rank 0's writer: see the module's docstring for what it writes and in which order."""

    def __init__(self, plan: RunPlan):
        super().__init__(plan, 0)
        self.config = plan.config
        self.board = Board(None)

    @property
    def log_file(self) -> str:
        return self.folder.path("train.log")

    @contextlib.contextmanager
    def claim(self) -> Iterator[None]:
        """Hold the folder's lock for the run (the kernel releases it if the process dies)."""
        os.makedirs(self.folder.folder, exist_ok=True)
        with self.folder.lock():
            try:
                yield
            finally:
                self.board.close()

    def _take_folder(self) -> None:
        """Under the lock: refuse a fresh run into another run's folder, remove a killed run's temporary files, and
        move what a retrain branches away from."""
        plan = self.plan
        if plan.resume is None:  # again: another run may have started since the plan
            self.folder.refuse_fresh_run()
        removed = remove_stale_temporaries(self.folder.folder)
        if removed:
            log.info("removed %d temporary file(s) a stopped run left in %s", len(removed), self.folder.folder)
        if plan.retrain and plan.resume is not None:
            moved_to = self.folder.branch_after(plan.resume.epoch)
            if moved_to:
                log.info("retrain branches at epoch %d: the original run's later checkpoints and metrics moved to %s",
                         plan.resume.epoch, moved_to)

    def start(self, resumed_updates: int) -> None:
        """Make the folder this run's, then its config, protocol and metrics (cut back to the resumed epoch), and
        TensorBoard (``resumed_updates``: the optimizer updates a resume starts from)."""
        folder, config = self.folder, self.config
        epoch = self.plan.start_epoch
        self._take_folder()
        with disk_errors(folder, "the run's config"):
            dump_yaml(config, folder.config_yaml)
            Preprocess.from_config(config).write(folder.model_prefix)
            self._keep_classes()
            truncate_jsonl(folder.metrics, epoch)
            self._restore_lost_metrics_line(epoch)
        if config.tensorboard:
            self.board = Board(config.tensorboard, config_text(config), then=self._next_step,
                               resumed_at=resumed_updates if self.plan.resume is not None else None)

    def _keep_classes(self) -> None:
        """The training data's classes.txt (``Shards.classes_file``, what the plan read) copied into the
        folder, for ``xception-score`` and ``xception-deploy``; a resumed run keeps the copy it has."""
        folder, source = self.folder, self.plan.shards.classes_file
        if not source or (self.plan.resume and os.path.isfile(folder.classes)):
            return
        names = read_classes(source)
        if len(names) != self.config.num_classes:
            log.info("%s names %d classes and the run trains %d: not copied into the run folder", source,
                     len(names), self.config.num_classes)
            return
        write_classes(folder.classes, names)

    def _next_step(self) -> str:
        return f"free space, then {self.folder.resume_hint()}"

    def _restore_lost_metrics_line(self, epoch: int) -> None:
        """A crash between an epoch's manifest and its metrics line loses the line: its manifest holds it."""
        if not epoch or epoch not in self.folder.epochs():
            return
        if any(r.get("epoch") == epoch for r in read_jsonl(self.folder.metrics)):
            return
        record = self.folder.manifest(epoch).metrics
        if record is not None:
            append_synced(self.folder.metrics, json.dumps(record.to_dict()) + "\n")

    def scalars(self, step: int, values: dict) -> None:
        self.board.scalars(step, values)

    def save_recovery(self, state: TrainState) -> None:
        """The mid-epoch checkpoint written every ``--checkpoint-interval`` minutes."""
        self.save_stopped(state)
        where = state.progress.in_progress
        if where is not None:
            log.info("recovery checkpoint: epoch %d, batch %d", where.epoch, where.batches_done)

    def save_stopped(self, state: TrainState) -> None:
        """The mid-epoch checkpoint of a run stopped by a signal (``state`` holds its position)."""
        self._save_state(None, state, None)

    def export(self, epoch: int, net: gluon.HybridBlock) -> None:
        """The epoch's export (what ``xception-score`` loads) at the paper's widths whatever the run computed with,
        and its SoftmaxOutput twin with ``--softmax-head``."""
        with disk_errors(self.folder, f"the export of epoch {epoch}"):
            export_atomic(canonical_export(net, self.config.input_size), self.folder.model_prefix, epoch)
            if self.config.softmax_head:
                from .deploy import add_softmax_head

                prefix = self.folder.model_prefix
                add_softmax_head(prefix, epoch, f"{prefix}-softmax", epoch, check=False)

    def save_epoch(self, state: TrainState, record: EpochRecord, lr_steps: list | None = None) -> None:
        """After :meth:`export`: the state and manifest, then the metrics line (with ``lr_steps``, the (update, lr)
        pairs of the log interval: ``lr_last`` and ``lr_steps``) and what follows from it."""
        folder, epoch = self.folder, record.epoch
        self.board.scalars(_updates(state), {f"epoch/{k}": v for k, v in record.to_dict().items()})
        self._save_state(epoch, state, record)
        line = record.to_dict()
        if lr_steps:
            line.update(lr_last=lr_steps[-1][1], lr_steps=[list(step) for step in lr_steps])
        with disk_errors(folder, f"the metrics of epoch {epoch}"):
            append_synced(folder.metrics, json.dumps(line) + "\n")
        folder.remove(None)  # a mid-epoch checkpoint is now stale
        best = state.progress.best
        folder.prune(epoch, self.config.keep_last, best.epoch if best else None)
        with disk_errors(folder, "best.json and curves.png"):
            atomic_write_text(folder.best, json.dumps(best.to_dict() if best else {}, indent=1, sort_keys=True))
            plot_curves(folder.metrics, folder.curves)

    def _save_state(self, epoch: int | None, state: TrainState, record: EpochRecord | None) -> None:
        """The state arrays and their manifest (``epoch`` None: the mid-epoch checkpoint)."""
        self.board.flush()  # the event files hold at least what the checkpoint does
        manifest = Manifest(state.progress, self.config.to_dict(), self.plan.schedule, record, mx.__version__,
                            self.folder.prefix, os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice"))
        what = f"the checkpoint of epoch {epoch}" if epoch is not None else "the mid-epoch checkpoint"
        with disk_errors(self.folder, what):
            save_state(self.folder, epoch, state.arrays, manifest)


def _updates(state: TrainState) -> int:
    return int(state.progress.optimizer.get("num_update", 0))


def make_writer(plan: RunPlan, rank: int) -> NullWriter:
    """Rank 0 writes the run; every other rank gets a writer that writes nothing."""
    return RunWriter(plan) if rank == 0 else NullWriter(plan, rank)
