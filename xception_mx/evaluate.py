"""Devices and evaluation, shared by the trainer's validation and ``score.py``.

Importing it loads MXNet and the data iterators, but not the trainer, the distributed engine or gluoncv.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import mxnet as mx
import numpy as np
from mxnet import gluon

from .errors import UserError
from .metrics import Accumulator
from .records import check_labels

__all__ = ["make_contexts", "evaluate"]


def make_contexts(gpus: Sequence[int], cpus: int = 1) -> list[mx.Context]:
    """GPU contexts for ``gpus``, else ``cpus`` CPU contexts; one line when a GPU is not there."""
    if gpus:
        available = mx.context.num_gpus()
        if available == 0:
            raise UserError(f"--gpus {','.join(map(str, gpus))} asked for GPUs, but this MXNet build sees none "
                            f"(CPU-only wheel or no driver): install mxnet-cu112 (see README) or drop --gpus")
        bad = [g for g in gpus if g >= available]
        if bad:
            raise UserError(f"--gpus names GPU {bad[0]}, but only {available} GPU(s) are visible "
                            f"(ids 0..{available - 1})")
        if len(set(gpus)) != len(gpus):
            raise UserError(f"--gpus lists a GPU twice: {','.join(map(str, gpus))}")
        return [mx.gpu(g) for g in gpus]
    return [mx.cpu(i) for i in range(cpus)]


def evaluate(net, val_data, ctx: list[mx.Context], num_classes: int,
             on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Accumulator:
    """Top-1/top-5 and mean cross-entropy over every image of ``val_data`` once (last batch's padding dropped).

    ``on_batch(logits, labels)`` sees each batch's valid rows (for confusion matrices, progress bars).
    """
    acc = Accumulator()
    for batch in val_data:
        x = batch.data[0]
        labels = batch.label[0].asnumpy()
        valid = x.shape[0] - (batch.pad or 0)
        check_labels(labels[:valid], num_classes)
        y = labels.astype(np.int64)[:valid]
        xs = gluon.utils.split_and_load(x, ctx, even_split=False)
        logits = np.concatenate([net(xi).astype("float32").asnumpy() for xi in xs])[:valid]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        acc.update(logits, y, -log_probs[np.arange(valid), y])
        if on_batch is not None:
            on_batch(logits, y)
    return acc
