"""What a run builds from its configuration: the network, the learning-rate schedule, the optimizer's settings."""
from __future__ import annotations

from . import finetune
from .errors import UserError
from .model import Xception, get_model
from .schedule import build_lr_scheduler

__all__ = ["build_net", "build_schedule", "optimizer_params"]


def build_net(config: dict) -> Xception:
    overrides = dict(num_classes=config["num_classes"], dropout=config["dropout"],
                     bn_momentum=config["bn_momentum"], bn_epsilon=config["bn_epsilon"])
    if config["pretrained"]:  # converted Keras weights need Keras's pooling and BN epsilon
        overrides.update(finetune.model_overrides(config["pretrained"]))
    if config["filter_list"] is not None:
        overrides["filter_list"] = tuple(config["filter_list"])
    try:
        return get_model(config["model"], **overrides)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def build_schedule(config: dict, origin: dict, batches_per_epoch: int):
    """The run's LR schedule; ``origin`` (start_epoch, lr, warmup_epochs) is where it starts (a retrain: later)."""
    return build_lr_scheduler(
        config["lr_mode"], origin["lr"], config["num_epochs"], batches_per_epoch,
        start_epoch=origin["start_epoch"], warmup_epochs=origin["warmup_epochs"], warmup_lr=config["warmup_lr"],
        decay=config["lr_decay"], decay_period=config["lr_decay_period"], step_epochs=config["lr_step_epochs"],
        power=config["poly_power"], target_lr=config["target_lr"])


def optimizer_params(config: dict, lr_scheduler) -> dict:
    params = {"wd": config["wd"], "lr_scheduler": lr_scheduler, "multi_precision": config["dtype"] == "float16"}
    if config["optimizer"] in ("sgd", "nag"):
        params["momentum"] = config["momentum"]
    elif config["optimizer"] == "rmsprop":
        params["gamma1"] = config["momentum"]
    return params
