"""One optimizer update on several devices, and its inputs: dense (smoothed, mixed-up) targets and the seeding.

An update of ``accumulate`` micro-batches sums their gradients explicitly into the gradient of the last one (not
``grad_req='add'``, which has numerical problems in MXNet 1.x: apache/mxnet#16686, #16708), then the trainer
reduces them over devices and workers, clipping (optional) scales them to a global norm, and the optimizer steps
once. Nothing here reads a value back to the host.
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

__all__ = ["TrainStep", "StepOutput", "train_step", "mix_batch", "seed_everything"]


@dataclass
class StepOutput:
    outputs: list  # logits per (micro-batch, device)
    losses: list  # per-image losses, same order
    labels: list  # integer labels on the devices, same order
    grad_norm: mx.nd.NDArray | None  # the global norm before clipping (device 0; None when clipping is off)


class TrainStep:
    """``step(x, target, labels)``: forward and backward of ``accumulate`` micro-batches split over ``ctx``, one
    update of the global batch."""

    def __init__(self, net, trainer: gluon.Trainer, loss_fn, ctx: list[mx.Context], step_size: int,
                 accumulate: int = 1, clip_grad_norm: float = 0.0, precision=None):
        self.net, self.trainer, self.loss_fn, self.ctx = net, trainer, loss_fn, ctx
        self.step_size, self.accumulate, self.clip = step_size, accumulate, clip_grad_norm
        self.precision = precision
        self.params = [p for p in net.collect_params().values() if p.grad_req != "null"]
        # Gradient sums of the micro-batches before the last, per param and device; the first micro-batch fills it.
        self._sums: list[mx.nd.NDArray] = []

    def __call__(self, x: mx.nd.NDArray, target: mx.nd.NDArray, labels: mx.nd.NDArray) -> StepOutput:
        outputs, losses, label_parts = [], [], []
        micro = x.shape[0] // self.accumulate
        for m in range(self.accumulate):
            part = slice(m * micro, (m + 1) * micro)
            out, loss, lab = self._forward_backward(x[part], target[part], labels[part])
            outputs += out
            losses += loss
            label_parts += lab
            if self.accumulate > 1:
                self._accumulate(first=m == 0, last=m == self.accumulate - 1)
        norm = None
        if self.clip > 0:
            self.trainer.allreduce_grads()
            norm = self._clip()
            self.trainer.update(self.step_size)
        else:
            self.trainer.step(self.step_size)
        return StepOutput(outputs, losses, label_parts, norm)

    def _forward_backward(self, x, target, labels):
        xs = gluon.utils.split_and_load(x, self.ctx, even_split=True)
        ts = gluon.utils.split_and_load(target, self.ctx, even_split=True)
        ls = gluon.utils.split_and_load(labels, self.ctx, even_split=True)
        with autograd.record():
            outputs = [self.net(xi) for xi in xs]
            losses = [self.loss_fn(o, t) for o, t in zip(outputs, ts)]
            with self.precision.scaled(losses) if self.precision else nullcontext(losses) as scaled:
                autograd.backward(scaled)
        return outputs, losses, ls

    def _accumulate(self, first: bool, last: bool) -> None:
        """After micro-batch m's backward: keep its gradients (m = 0), add them (middle), or add the kept sum into
        the last micro-batch's gradients, which the trainer then uses."""
        grads = [g for p in self.params for g in p.list_grad()]
        if first:
            self._sums = self._sums or [mx.nd.zeros(g.shape, g.context, dtype=g.dtype) for g in grads]
            for g, s in zip(grads, self._sums):
                g.copyto(s)
        elif last:
            for g, s in zip(grads, self._sums):
                g += s
        else:
            for g, s in zip(grads, self._sums):
                s += g

    def _clip(self) -> mx.nd.NDArray:
        """Scale the reduced gradients down to global norm ``clip`` (of the mean gradient: the trainer's rescale,
        including the loss scale, is applied first); returns that norm before clipping, on device 0."""
        unit = self.trainer._scale / self.step_size  # raw gradient sum -> mean gradient, loss scale divided out
        norms = []
        for d in range(len(self.ctx)):  # every device holds the same reduced gradients: clip each the same way
            grads = [p.list_grad()[d] for p in self.params]
            norms.append(gluon.utils.clip_global_norm(grads, self.clip / unit, check_isfinite=False))
        return norms[0] * unit


def train_step(net, trainer: gluon.Trainer, loss_fn, x: mx.nd.NDArray, target: mx.nd.NDArray,
               ctx: list[mx.Context], step_size: int) -> tuple[list, list]:
    """One plain update (no accumulation, clipping or loss scaling), for benchmarks and tests."""
    out = TrainStep(net, trainer, loss_fn, ctx, step_size)(x, target, target)
    return out.outputs, out.losses


def mix_batch(x: mx.nd.NDArray, labels: mx.nd.NDArray, num_classes: int, alpha: float, smoothing: float,
              rng: np.random.RandomState) -> tuple[mx.nd.NDArray, mx.nd.NDArray]:
    """Dense targets with label smoothing and, when alpha > 0, mixup with the batch reversed (on the device; the
    mixing weight comes from ``rng`` on the host)."""
    onehot = mx.nd.one_hot(labels, num_classes)
    if smoothing:
        onehot = onehot * (1.0 - smoothing) + smoothing / num_classes
    if alpha > 0:
        lam = float(rng.beta(alpha, alpha))
        x = lam * x + (1.0 - lam) * mx.nd.reverse(x, axis=0)
        onehot = lam * onehot + (1.0 - lam) * mx.nd.reverse(onehot, axis=0)
    return x, onehot


def seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value % (2**32))
    mx.random.seed(value)
