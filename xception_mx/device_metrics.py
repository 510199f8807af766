"""The training loop's running figures, kept on the devices: each step adds its image count, loss sum and top-1/top-5
hits to a small array per device, and the host reads them back only when asked (the log interval, a checkpoint, the
end of the epoch). Nothing in a step then forces MXNet's engine to wait for Python, which is what lets it run ahead
on GPUs."""
from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet import autograd

from .metrics import Accumulator

__all__ = ["DeviceSums"]


class DeviceSums:
    """Per-device float64 sums [images, loss, top-1 hits, top-5 hits] since the last :meth:`drain`."""

    def __init__(self, ctx: list[mx.Context], num_classes: int):
        self.k5 = min(5, num_classes)
        self._sums = {c: mx.nd.zeros((4,), ctx=c, dtype="float64") for c in ctx}

    def add(self, outputs: list, losses: list, labels: list) -> None:
        """Queue the sums of one step's ``outputs`` (logits), ``losses`` and integer ``labels`` (per device); no
        host read."""
        with autograd.pause():
            for logits, loss, label in zip(outputs, losses, labels):
                logits = logits.astype("float32", copy=False)
                top1 = (mx.nd.argmax(logits, axis=1) == label).sum()
                top5 = (mx.nd.topk(logits, axis=1, k=self.k5) == label.reshape((-1, 1))).sum()
                count = mx.nd.full((1,), label.shape[0], ctx=label.context)
                step = mx.nd.concat(count, loss.astype("float32", copy=False).sum(), top1, top5, dim=0)
                self._sums[label.context] += step.astype("float64")

    def drain(self, into: Accumulator) -> Accumulator:
        """Read the sums back (one host wait per device), add them to ``into`` and start again from zero."""
        for array in self._sums.values():
            count, loss_sum, top1, top5 = array.asnumpy()
            array[:] = 0
            into.count += int(round(count))
            into.loss_sum += float(loss_sum)
            into.correct[1] += int(round(top1))
            into.correct[5] += int(round(top5))
        return into

    @staticmethod
    def finite(acc: Accumulator) -> bool:
        return bool(np.isfinite(acc.loss_sum))
