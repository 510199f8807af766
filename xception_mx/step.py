"""One training step on several devices, and its inputs: dense (smoothed, mixed-up) targets and the seeding."""
from __future__ import annotations

import random

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

__all__ = ["train_step", "mix_batch", "seed_everything"]


def train_step(net, trainer: gluon.Trainer, loss_fn, x: mx.nd.NDArray, target: mx.nd.NDArray,
               ctx: list[mx.Context], global_batch: int) -> tuple[list, list]:
    """Split the batch evenly over ``ctx``, forward and backward on each device, then one optimizer step.

    The trainer sums gradients over devices (and workers) and scales them by ``1 / global_batch``.
    """
    xs = gluon.utils.split_and_load(x, ctx, even_split=True)
    ts = gluon.utils.split_and_load(target, ctx, even_split=True)
    with autograd.record():
        outputs = [net(xi) for xi in xs]
        losses = [loss_fn(o, t) for o, t in zip(outputs, ts)]
    autograd.backward(losses)
    trainer.step(global_batch)
    return outputs, losses


def mix_batch(x: mx.nd.NDArray, y: np.ndarray, num_classes: int, alpha: float, smoothing: float,
              rng: np.random.RandomState) -> tuple[mx.nd.NDArray, mx.nd.NDArray]:
    """Dense targets with label smoothing and, when alpha > 0, mixup with the batch reversed."""
    onehot = np.eye(num_classes, dtype=np.float32)[y]
    if smoothing:
        onehot = onehot * (1.0 - smoothing) + smoothing / num_classes
    if alpha > 0:
        lam = float(rng.beta(alpha, alpha))
        x = lam * x + (1.0 - lam) * x[::-1]
        onehot = lam * onehot + (1.0 - lam) * onehot[::-1]
    return x, mx.nd.array(onehot)


def seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value % (2**32))
    mx.random.seed(value)
