"""Padded widths (``channel_multiple``): compute with every width rounded up to a multiple, files in the paper's.

MXNet 1.9.1 refuses every oneDNN convolution whose memory would be padded (``GetConvFwdImpl`` and both backward
paths in ``src/operator/nn/mkldnn/mkldnn_convolution.cc``; no upstream issue found), so widths that are not
multiples of 16 (728, 364) lose oneDNN's blocked AVX-512/AMX kernels. A network built with ``channel_multiple=16``
has 736 where the paper has 728, and every added channel is exactly zero: the weights that read or write it and
its BatchNorm gamma, beta and statistics are zero, so its activation is zero (BN of a constant channel is beta,
ReLU(0) = 0) and every gradient reaching it is zero. The network computes the paper's function; only the memory
layout changes.

:class:`ChannelLayout` maps a padded network's named arrays to the paper's shapes (the leading slice in every
axis) and back (zero-filled), so what is written to disk keeps the paper's shapes. :class:`Padded` gives the
models ``canonical_twin()`` and an ``initialize`` that zeroes the added channels.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import mxnet as mx
import numpy as np
from mxnet import gluon

__all__ = ["round_up", "ChannelLayout", "Padded", "canonical_export"]

Shape = tuple[int, ...]


def round_up(width: int, multiple: int) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (1: unchanged)."""
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"channel_multiple must be a positive integer, got {multiple!r}")
    return -(-width // multiple) * multiple


@dataclass(frozen=True)
class ChannelLayout:
    """The parameters whose padded shape differs from the paper's: name -> (canonical, padded) shape. Empty for a
    network built with ``channel_multiple=1``, where every mapping is the identity."""
    shapes: dict[str, tuple[Shape, Shape]] = field(default_factory=dict)

    @classmethod
    def of(cls, net: gluon.Block) -> ChannelLayout:
        """The layout of a model (``Xception``, ``XceptionAligned``) against its canonical twin."""
        twin = net.canonical_twin() if getattr(net, "channel_multiple", 1) > 1 else None
        if twin is None:
            return cls()
        padded = net._collect_params_with_prefix()
        canonical = twin._collect_params_with_prefix()
        return cls({name: (tuple(canonical[name].shape), tuple(p.shape)) for name, p in padded.items()
                    if tuple(canonical[name].shape) != tuple(p.shape)})

    def _owner(self, key: str) -> str | None:
        """The parameter a state array belongs to: ``param/NAME``, ``ema/NAME``, ``optim/NAME`` or
        ``optim/NAME.K`` (an optimizer's K-th state array), or NAME itself."""
        name = key.split("/", 1)[1] if key.startswith(("param/", "ema/", "optim/")) else key
        if name in self.shapes:
            return name
        base, _, index = name.rpartition(".")
        return base if index.isdigit() and base in self.shapes else None

    def to_canonical(self, arrays: dict[str, mx.nd.NDArray]) -> dict[str, mx.nd.NDArray]:
        """Each array sliced to the paper's shape (arrays of unpadded parameters pass through)."""
        out = {}
        for key, array in arrays.items():
            owner = self._owner(key)
            if owner is None or tuple(array.shape) != self.shapes[owner][1]:
                out[key] = array
            else:  # through the host: mx.nd.slice dies of SIGFPE on arrays in oneDNN's blocked layouts
                lead = tuple(slice(0, n) for n in self.shapes[owner][0])
                out[key] = mx.nd.array(array.asnumpy()[lead], ctx=array.context, dtype=array.dtype)
        return out

    def zero_added(self, arrays: dict[str, mx.nd.NDArray], statistics_only: bool = False) -> None:
        """Set the added channels of ``arrays`` (name -> array) to zero in place; ``statistics_only``: BatchNorm's
        running statistics alone (oneDNN's BatchNorm leaves ~1e-10 in the running_var of an all-zero channel, and
        an EMA follows it; trainable parameters stay exactly zero by themselves)."""
        for name, array in arrays.items():
            if name in self.shapes and not (statistics_only and not name.endswith(("running_mean", "running_var"))):
                array[:] = self.to_padded(self.to_canonical({name: array}))[name]

    def to_padded(self, arrays: dict[str, mx.nd.NDArray]) -> dict[str, mx.nd.NDArray]:
        """Each array of the paper's shape placed in a zero array of the padded shape (the leading slice)."""
        out = {}
        for key, array in arrays.items():
            owner = self._owner(key)
            if owner is None or tuple(array.shape) != self.shapes[owner][0]:
                out[key] = array
            else:
                padded = np.zeros(self.shapes[owner][1], dtype=array.dtype)
                padded[tuple(slice(0, n) for n in array.shape)] = array.asnumpy()
                out[key] = mx.nd.array(padded, ctx=array.context, dtype=array.dtype)
        return out


class Padded:
    """For a model built with ``channel_multiple``: its paper-width twin and initialisation with the added
    channels zeroed. The model sets ``channel_multiple`` and ``_twin_kwargs`` (its constructor's arguments)."""

    channel_multiple: int = 1
    _twin_kwargs: dict

    def canonical_twin(self) -> gluon.HybridBlock:
        """The same model at the paper's widths, with the same parameter names (its parameters hold no data)."""
        return type(self)(**{**self._twin_kwargs, "channel_multiple": 1},  # type: ignore[call-arg]
                          prefix=self.prefix)  # type: ignore[attr-defined]

    def initialize(self, init=mx.init.Uniform(), ctx=None, verbose=False, force_reinit=False):  # noqa: B008
        """Gluon's initialize; a padded network takes the weights its paper-width twin draws (the same draws as a
        network built with ``channel_multiple=1`` from the same seed), the added channels zero."""
        if self.channel_multiple == 1:
            return super().initialize(init, ctx, verbose, force_reinit)
        twin = self.canonical_twin()
        twin.initialize(init, ctx=mx.cpu(), verbose=verbose)
        super().initialize(init, ctx, verbose, force_reinit)
        layout = ChannelLayout.of(self)
        arrays = layout.to_padded({n: p.data() for n, p in twin._collect_params_with_prefix().items()})
        for name, param in self._collect_params_with_prefix().items():
            param.set_data(arrays[name])

    def zero_added_channels(self, statistics_only: bool = False) -> None:
        """Set the added channels of every parameter (on every device) to zero: what keeps the paper's function
        (``statistics_only``: see :meth:`ChannelLayout.zero_added`)."""
        if self.channel_multiple == 1:
            return
        layout = ChannelLayout.of(self)
        for name, param in self._collect_params_with_prefix().items():  # type: ignore[attr-defined]
            if param._data is not None:
                for data in param.list_data():
                    layout.zero_added({name: data}, statistics_only)


def canonical_export(net: gluon.HybridBlock, input_size: int) -> gluon.HybridBlock:
    """What to export: ``net`` itself at the paper's widths, else its paper-width twin holding ``net``'s weights
    (sliced, on the CPU), hybridized and traced once, so exports keep the paper's shapes and names. The twin is built
    once per ``net`` and refilled at every call: a new one per epoch grew the trainer by ~0.4 MiB an epoch."""
    if getattr(net, "channel_multiple", 1) == 1:
        return net
    layout = ChannelLayout.of(net)
    arrays = layout.to_canonical({n: p.data().as_in_context(mx.cpu())
                                  for n, p in net._collect_params_with_prefix().items()})
    twin = _EXPORT_TWINS.get(net)
    if twin is None:
        twin = net.canonical_twin()
        twin.initialize(mx.init.Zero(), ctx=mx.cpu())  # no random draws: the run's generators are left alone
        twin.hybridize()
    for name, param in twin._collect_params_with_prefix().items():
        param.set_data(arrays[name])
    if net not in _EXPORT_TWINS:
        twin(mx.nd.zeros((1, 3, input_size, input_size)))  # traced once, with the weights in place
        _EXPORT_TWINS[net] = twin
    return twin


#: Each padded network's export twin (not an attribute: a Block would adopt it as a child).
_EXPORT_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
