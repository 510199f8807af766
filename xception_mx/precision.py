"""Mixed precision through MXNet's own ``mx.contrib.amp``: ``--amp bfloat16`` (oneDNN, CPUs) and ``--amp float16``
(GPUs, dynamic loss scaling).

``amp.init`` rewrites MXNet's operator functions before the network is built, so the hybridized graph casts its
convolutions and dense layers to the low precision while BatchNorm, the softmax/loss and the optimizer stay float32.
The parameters remain float32 (they are the master weights the optimizer updates, what checkpoints and EMA hold);
exports are float32 graphs (``HybridBlock.export`` saves the symbol with ``remove_amp_cast=True``). MXNet's loss
scaler lives on the gluon Trainer; :class:`Precision` saves and restores its state with the run.
"""
from __future__ import annotations

from contextlib import nullcontext

import mxnet as mx

from .cpuinfo import BLOCKED_CHANNELS

__all__ = ["Precision"]

_initialised: str | None = None


def _init_amp(mode: str) -> None:
    """``amp.init`` once per process (it patches MXNet's operator namespaces and cannot be undone)."""
    global _initialised
    if _initialised == mode:
        return
    if _initialised is not None:
        raise RuntimeError(f"AMP was initialised for {_initialised} in this process; {mode} needs a new process")
    from mxnet.contrib import amp

    plain_convolution = mx.symbol.Convolution
    amp.init(target_dtype=mode)
    if mode == "bfloat16":
        _keep_depthwise_float32(plain_convolution)
    _initialised = mode




def _keep_depthwise_float32(plain_convolution) -> None:
    """Under bfloat16 AMP, a grouped (depthwise) convolution whose width is not a multiple of 16 runs in float32:
    its input is cast once to float32 and MXNet's own operator runs. Every other convolution runs bfloat16, so a
    network at padded widths (``channel_multiple`` 16) runs all of its depthwise convolutions in bfloat16.

    Workaround: at 728 channels (the middle flow at the paper's widths), MXNet 1.9.1 rejects oneDNN's blocked
    layouts, whose memory is padded (``src/operator/nn/mkldnn/mkldnn_convolution.cc`` refuses a primitive whose
    memory size differs from the NDArray's), so a bfloat16 depthwise convolution falls to oneDNN's plain-layout
    gemm: 4 GFLOP/s against 13 for float32 at batch 16, 19x19, and 80x slower than float32 under AMX at 37x37.
    At 736 the blocked bfloat16 kernel runs (benchmarks/README.md, "Mixed precision"). AMP's own
    ``conditional_fp32_ops`` would cast the input to bfloat16 and back. Gluon's hybridized layers call
    ``mx.symbol.Convolution``, which is what is wrapped.
    """
    amp_convolution = mx.symbol.Convolution

    def convolution(*args, **kwargs):
        grouped = int(kwargs.get("num_group", 1)) > 1
        if grouped and args and int(kwargs.get("num_filter", 0)) % BLOCKED_CHANNELS:
            return plain_convolution(mx.symbol.amp_cast(args[0], dtype="float32"), *args[1:], **kwargs)
        return amp_convolution(*args, **kwargs)

    convolution.__name__, convolution.__doc__ = amp_convolution.__name__, amp_convolution.__doc__
    mx.symbol.Convolution = convolution


class Precision:
    """A run's precision: ``off``, ``bfloat16`` or ``float16``. Create it before the network is built."""

    def __init__(self, mode: str, loss_scale_window: int = 2000):
        self.mode, self.loss_scale_window = mode, loss_scale_window
        self.trainer = None
        if mode != "off":
            _init_amp(mode)

    @property
    def scales_loss(self) -> bool:
        """float16 alone: bfloat16 has float32's exponent range, so its gradients do not underflow."""
        return self.mode == "float16"

    def attach(self, trainer: mx.gluon.Trainer) -> None:
        """Give the trainer MXNet's dynamic loss scaler (float16): the loss is multiplied by the scale, the update
        divides it out, and a step whose gradients overflow is skipped and halves the scale."""
        if not self.scales_loss:
            return
        from mxnet.contrib import amp

        amp.init_trainer(trainer)
        trainer._amp_loss_scaler._scale_seq_len = self.loss_scale_window
        self.trainer = trainer

    @property
    def scaler(self):
        return getattr(self.trainer, "_amp_loss_scaler", None)

    @property
    def loss_scale(self) -> float | None:
        return None if self.scaler is None else float(self.scaler.loss_scale)

    def scaled(self, losses: list):
        """A context giving the losses to call backward on (multiplied by the loss scale under float16)."""
        if self.scaler is None:
            return nullcontext(losses)
        from mxnet.contrib import amp

        return amp.scale_loss(losses, self.trainer)

    def state(self) -> dict | None:
        """The loss scaler's state (scale, the next scale, good steps since the last change), or None."""
        s = self.scaler
        if s is None:
            return None
        return {"loss_scale": s._loss_scale, "next_loss_scale": s._next_loss_scale, "good_steps": s._unskipped}

    def restore(self, state: dict | None) -> None:
        s = self.scaler
        if s is None or not state:
            return
        s._loss_scale, s._next_loss_scale = float(state["loss_scale"]), float(state["next_loss_scale"])
        s._unskipped = int(state["good_steps"])
