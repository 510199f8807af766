"""What a run builds from its configuration: the network, the learning-rate schedule, the optimizer's settings, the
training and validation iterators of one worker."""
from __future__ import annotations

from typing import Any

from mxnet.gluon import HybridBlock

from . import data, finetune
from .config import RunConfig
from .errors import UserError
from .manifest import ScheduleOrigin
from .protocol import Preprocess
from .registry import get_model
from .schedule import build_lr_scheduler

__all__ = ["build_net", "build_schedule", "optimizer_params", "train_data", "val_data"]


def build_net(config: RunConfig, channel_multiple: int = 1) -> HybridBlock:
    """The registered model ``config.model`` with the run's head, dropout and BatchNorm settings, computing at widths
    rounded up to ``channel_multiple`` (``plan.channel_multiple``)."""
    overrides: dict[str, Any] = dict(channel_multiple=channel_multiple, num_classes=config.num_classes,
                                     dropout=config.dropout, bn_momentum=config.bn_momentum,
                                     bn_epsilon=config.bn_epsilon)
    if config.pretrained:  # converted Keras weights need Keras's pooling and BN epsilon
        overrides.update(finetune.model_overrides(config.pretrained))
    if config.filter_list is not None:
        overrides["filter_list"] = tuple(config.filter_list)
    try:
        return get_model(config.model, **overrides)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def build_schedule(config: RunConfig, origin: ScheduleOrigin, batches_per_epoch: int):
    """The run's LR schedule; ``origin`` (start_epoch, lr, warmup_epochs) is where it starts (a retrain: later)."""
    return build_lr_scheduler(
        config.lr_mode, origin.lr, config.num_epochs, batches_per_epoch,
        start_epoch=origin.start_epoch, warmup_epochs=origin.warmup_epochs, warmup_lr=config.warmup_lr,
        decay=config.lr_decay, decay_period=config.lr_decay_period, step_epochs=config.lr_step_epochs,
        power=config.poly_power, target_lr=config.target_lr)


def optimizer_params(config: RunConfig, lr_scheduler) -> dict:
    # No multi_precision: under AMP the parameters themselves stay float32 (the master weights).
    params: dict[str, Any] = {"wd": config.wd, "lr_scheduler": lr_scheduler}
    if config.optimizer in ("sgd", "nag"):
        params["momentum"] = config.momentum
    elif config.optimizer == "rmsprop":
        params["gamma1"] = config.momentum
    return params


def train_data(config: RunConfig, shards: list[str], batch: int, epoch: int, num_parts: int, part: int):
    """One epoch of training batches of part ``part`` (this worker) of ``num_parts``."""
    size = config.input_size
    return data.train_iter(
        shards, batch, (3, size, size), epoch=epoch, seed=config.seed, num_parts=num_parts, part_index=part,
        mean=tuple(config.mean), std=tuple(config.std), min_area=config.min_area, mirror=config.mirror,
        color_jitter=config.color_jitter, pca_noise=config.pca_noise,
        preprocess_threads=config.preprocess_threads)


def val_data(config: RunConfig, shards: list[str], batch: int, num_parts: int, part: int):
    """Validation batches of this worker's part, under the run's evaluation protocol."""
    size, pre = config.input_size, Preprocess.from_config(config)
    return data.val_iter(shards, batch, (3, size, size), crop_pct=pre.crop_pct, mean=pre.mean, std=pre.std,
                         inter_method=pre.inter_method, num_parts=num_parts, part_index=part,
                         preprocess_threads=config.preprocess_threads)
