"""Learning-rate schedules, composed from GluonCV's ``LRScheduler`` segments with ``LRSequential``.

MXNet's optimizer asks the scheduler for ``lr(num_update)`` with ``num_update`` starting at 1, and the schedule is a
pure function of it: restoring the optimizer's update counter restores the schedule position exactly, whatever the
device list. A leading constant segment of ``1 + start_epoch * iters_per_epoch`` updates makes the first step of
``start_epoch + 1`` see position 0 of the real schedule (its first lr is exactly ``lr`` or ``warmup_lr``).
"""
from __future__ import annotations

from collections.abc import Sequence

from gluoncv.utils.lr_scheduler import LRScheduler, LRSequential

__all__ = ["build_lr_scheduler"]


def build_lr_scheduler(mode: str, lr: float, num_epochs: int, iters_per_epoch: int, *, start_epoch: int = 0,
                       warmup_epochs: int = 0, warmup_lr: float = 0.0, decay: float = 0.94, decay_period: int = 2,
                       step_epochs: Sequence[int] | None = None, power: float = 2.0,
                       target_lr: float = 0.0) -> LRSequential:
    """The schedule of a run (or a retrain) that starts after ``start_epoch`` epochs and ends at ``num_epochs``.

    ``mode``: ``exp`` (x ``decay`` every ``decay_period`` epochs: the paper's 0.94 every 2), ``step`` (x ``decay`` at
    each absolute epoch in ``step_epochs``), ``cosine`` or ``poly`` (to ``target_lr``). ``warmup_epochs`` of linear
    warm-up from ``warmup_lr`` come first.
    """
    if iters_per_epoch < 1:
        raise ValueError("iters_per_epoch must be >= 1")
    if not 0 <= start_epoch < num_epochs:
        raise ValueError(f"start_epoch {start_epoch} must be in [0, num_epochs={num_epochs})")
    first_lr = warmup_lr if warmup_epochs else lr
    segments = [LRScheduler("constant", base_lr=first_lr, niters=1 + start_epoch * iters_per_epoch)]
    main_start = start_epoch
    if warmup_epochs:
        segments.append(_segment("linear", base_lr=warmup_lr, target_lr=lr, nepochs=warmup_epochs,
                                 iters_per_epoch=iters_per_epoch))
        main_start += warmup_epochs
    main_epochs = num_epochs - main_start
    if main_epochs < 1:
        raise ValueError(f"no epochs left after warm-up ({warmup_epochs}) from epoch {start_epoch}")
    common = dict(base_lr=lr, nepochs=main_epochs, iters_per_epoch=iters_per_epoch)
    if mode == "exp":
        steps = list(range(decay_period, main_epochs + 1, decay_period))
        segments.append(LRScheduler("step", step_epoch=steps, step_factor=decay, **common))
    elif mode == "step":
        steps = [e - main_start for e in (step_epochs or []) if e - main_start > 0]
        segments.append(LRScheduler("step", step_epoch=steps, step_factor=decay, **common))
    elif mode in ("cosine", "poly"):
        segments.append(_segment(mode, target_lr=target_lr, power=power, **common))
    else:
        raise ValueError(f"unknown lr mode {mode!r}")
    return LRSequential(segments)


def _segment(mode: str, **kwargs) -> LRScheduler:
    """GluonCV's segment, except that one of a single step is constant at its first lr: GluonCV's linear, cosine and
    poly segments divide by ``niters - 1`` and raise ZeroDivisionError at one step (dmlc/gluon-cv#1421; reached by a
    run of one batch per epoch)."""
    if kwargs["nepochs"] * kwargs["iters_per_epoch"] == 1:
        return LRScheduler("constant", base_lr=kwargs["base_lr"], niters=1)
    return LRScheduler(mode, **kwargs)
