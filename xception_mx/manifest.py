"""The typed records a run keeps and saves: an epoch's figures, mid-epoch progress, the schedule's origin, the
trainer's counters and a checkpoint's manifest. Imports no MXNet.

A manifest (``PREFIX-EEEE.state.json``) is JSON with one flat layout (``format`` 1): :meth:`Manifest.to_json` writes
it and :meth:`Manifest.from_json` reads it back, including manifests written before these records existed (an empty
best epoch was ``{"epoch": null, "val_top1": null}``; hand-made ones may lack optional keys).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EpochRecord", "InProgress", "ScheduleOrigin", "TrainProgress", "StateFile", "Manifest"]

FORMAT = 1


def _known(cls: type, data: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class EpochRecord:
    """One complete epoch's figures: a ``metrics.jsonl`` line, ``best.json``, the manifest's ``metrics``."""
    epoch: int
    lr: float | None = None  # the epoch's first step
    train_loss: float | None = None
    train_top1: float | None = None
    val_loss: float | None = None
    val_top1: float | None = None
    val_top5: float | None = None
    samples_per_sec: float | None = None
    time_s: float | None = None
    rss_mib: float | None = None  # this process's resident memory after the epoch (flat over a run: tested)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> EpochRecord | None:
        """None for no record (and for the old empty best, whose epoch is null)."""
        if not data or data.get("epoch") is None:
            return None
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class InProgress:
    """Where a mid-epoch checkpoint stopped: batches done in ``epoch``, the running figures (summed over the
    workers), the epoch's first lr and the time it had taken."""
    epoch: int
    batches_done: int
    acc: dict = field(default_factory=dict)
    first_lr: float | None = None
    elapsed: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> InProgress | None:
        return cls(**_known(cls, data)) if data else None


@dataclass(frozen=True)
class ScheduleOrigin:
    """Where the LR schedule starts: epoch 0 for a fresh run, the loaded epoch for a retrain."""
    start_epoch: int
    lr: float
    warmup_epochs: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ScheduleOrigin:
        return cls(int(data["start_epoch"]), float(data["lr"]), int(data["warmup_epochs"]))


@dataclass
class TrainProgress:
    """The trainer's counters (``Trainer.state()``'s non-array half): complete epochs, the best epoch, the
    optimizer's counters and layout, the loss scaler (float16) and the mid-epoch position."""
    epoch: int = 0
    best: EpochRecord | None = None
    optimizer: dict = field(default_factory=dict)
    amp: dict | None = None
    in_progress: InProgress | None = None


@dataclass(frozen=True)
class StateFile:
    """The state file a manifest belongs to: its size and CRC-32, and the token of a mid-epoch one's name."""
    size: int | None = None
    crc32: int | None = None
    token: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state_size": self.size, "state_crc32": self.crc32}
        if self.token:
            out["token"] = self.token
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> StateFile:
        data = data or {}
        return cls(data.get("state_size"), data.get("state_crc32"), data.get("token"))


@dataclass
class Manifest:
    """A checkpoint's manifest: the trainer's counters, the resolved config (as saved), the schedule's origin,
    the epoch's figures, and what wrote it. Written last, so its presence marks a complete checkpoint."""
    progress: TrainProgress
    config: dict
    schedule: ScheduleOrigin
    metrics: EpochRecord | None = None
    mxnet: str | None = None
    prefix: str | None = None
    engine: str | None = None
    files: StateFile = field(default_factory=StateFile)

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    @property
    def in_progress(self) -> InProgress | None:
        return self.progress.in_progress

    def to_json(self) -> dict[str, Any]:
        p = self.progress
        out: dict[str, Any] = {
            "format": FORMAT, "epoch": p.epoch, "best": p.best.to_dict() if p.best else None,
            "optimizer": p.optimizer, "amp": p.amp, "config": self.config, "schedule": self.schedule.to_dict(),
            "metrics": self.metrics.to_dict() if self.metrics else None, "mxnet": self.mxnet,
            "prefix": self.prefix, "engine": self.engine, "files": self.files.to_dict()}
        if p.in_progress is not None:
            out["in_progress"] = p.in_progress.to_dict()
        return out

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        progress = TrainProgress(int(data["epoch"]), EpochRecord.from_dict(data.get("best")),
                                 data.get("optimizer") or {}, data.get("amp"),
                                 InProgress.from_dict(data.get("in_progress")))
        return cls(progress, dict(data["config"]), ScheduleOrigin.from_dict(data["schedule"]),
                   EpochRecord.from_dict(data.get("metrics")), data.get("mxnet"), data.get("prefix"),
                   data.get("engine"), StateFile.from_dict(data.get("files")))
