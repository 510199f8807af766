"""Xception (Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", CVPR 2017), a Gluon HybridBlock.

The network reads top to bottom like the paper's Figure 5: entry flow (stem + blocks 1-3), middle flow (blocks 4-11,
the same block eight times), exit flow (block 12, two separable convs, global average pooling, classifier).

Widths come from a 7-entry ``filter_list``:
``[stem, block1, block2, block3 (= middle flow), block12, exit conv3, exit conv4]``; the stem's first conv has
``filter_list[0] // 2`` channels.

Child names follow timm's ``legacy_xception`` state dict one to one (``conv1``, ``bn1``, ``conv2``, ``bn2``,
``block1``..``block12`` with ``skip``/``skipbn``/``rep``, ``conv3``, ``bn3``, ``conv4``, ``bn4``, ``fc``), with the
feature extractor under ``features.``; importing timm weights is a rename (BN weight/bias -> gamma/beta) and no more.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import mxnet as mx
from mxnet.gluon import nn

from .padding import Padded, round_up
from .variants import PAPER_FILTER_LIST

__all__ = ["Xception", "XceptionFeatures", "SeparableConv2D", "XceptionBlock", "KerasSameMaxPool2D",
           "PAPER_FILTER_LIST", "POOL_PADDINGS", "MIN_INPUT_SIZE", "count_parameters", "FEATURES_NAME", "stable_name",
           "relu", "CONV_INIT", "DENSE_INIT"]

#: Keras documents 71 px as Xception's smallest input.
MIN_INPUT_SIZE = 71


# The initialisers of both families (this module's and ``aligned.py``'s), defined once here.
#: He-normal on fan-out for convolutions, as timm's legacy_xception initialises them.
CONV_INIT = mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2)
#: Glorot-uniform for the classifier, as Keras initialises Dense kernels.
DENSE_INIT = mx.init.Xavier(rnd_type="uniform", factor_type="avg", magnitude=3)


def relu(F, x):
    """ReLU as ``Activation``: oneDNN has a bfloat16 kernel for it, not for ``F.relu`` (under ``--amp bfloat16``
    ``F.relu`` ran 2.5x slower forward and 3.9x backward than in float32, measured with mx.profiler)."""
    return F.Activation(x, act_type="relu")


def _check_filter_list(filter_list: Sequence[int]) -> tuple[int, ...]:
    values = tuple(filter_list)
    if len(values) != 7 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"filter_list must be 7 positive integers, got {list(values)!r}")
    if values[0] < 2:
        raise ValueError(f"filter_list[0] must be at least 2 (the stem's first conv has filter_list[0] // 2 "
                         f"channels), got {values[0]}")
    return values


def _batch_norm(channels: int, epsilon: float, momentum: float) -> nn.BatchNorm:
    return nn.BatchNorm(in_channels=channels, epsilon=epsilon, momentum=momentum)


def _conv(in_channels: int, channels: int, kernel: int, stride: int = 1, padding: int = 0,
          groups: int = 1) -> nn.Conv2D:
    return nn.Conv2D(channels, kernel, strides=stride, padding=padding, groups=groups, use_bias=False,
                     in_channels=in_channels, weight_initializer=CONV_INIT)


class SeparableConv2D(nn.HybridBlock):
    """Depthwise 3x3 conv (one filter per channel) then pointwise 1x1 conv; no bias, nothing in between.

    Children ``conv1`` (depthwise) and ``pointwise`` match timm's ``SeparableConv2d``.
    """

    def __init__(self, in_channels: int, channels: int, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv1 = _conv(in_channels, in_channels, 3, padding=1, groups=in_channels)
            self.pointwise = _conv(in_channels, channels, 1)

    def hybrid_forward(self, F, x):
        return self.pointwise(self.conv1(x))


class XceptionBlock(nn.HybridBlock):
    """A residual block: ``reps`` x (ReLU, separable conv, BN), then a 3x3 stride-2 max pool when strided.

    The shortcut is a 1x1 conv + BN when the width or resolution changes, the identity otherwise.
    ``grow_first`` widens at the first separable conv (entry and middle flow) or the last (block 12).
    ``start_with_relu=False`` drops the leading ReLU (block 1 follows the stem's ReLU).
    ``rep`` holds ReLU, separable conv, BN and pool in timm's order, so ``rep.<i>`` indices match timm's.
    """

    def __init__(self, in_channels: int, channels: int, reps: int, stride: int = 1, start_with_relu: bool = True,
                 grow_first: bool = True, bn_epsilon: float = 1e-3, bn_momentum: float = 0.99,
                 pool_padding: str = "symmetric", channel_multiple: int = 1, **kwargs):
        super().__init__(**kwargs)
        self._stride = stride
        self._pool_padding = pool_padding
        w = (lambda c: round_up(c, channel_multiple))  # noqa: E731  (the shortcut is decided on the paper's widths)
        with self.name_scope():
            if channels != in_channels or stride != 1:
                self.skip = _conv(w(in_channels), w(channels), 1, stride=stride)
                self.skipbn = _batch_norm(w(channels), bn_epsilon, bn_momentum)
            else:
                self.skip = None
                self.skipbn = None
            self.rep = nn.HybridSequential(prefix="rep_")
            with self.rep.name_scope():
                for i in range(reps):
                    if grow_first:
                        rep_in, rep_out = (in_channels if i == 0 else channels), channels
                    else:
                        rep_in, rep_out = in_channels, (in_channels if i < reps - 1 else channels)
                    if i > 0 or start_with_relu:
                        self.rep.add(nn.Activation("relu"))
                    self.rep.add(SeparableConv2D(w(rep_in), w(rep_out)))
                    self.rep.add(_batch_norm(w(rep_out), bn_epsilon, bn_momentum))
                if stride != 1:
                    self.rep.add(_max_pool(stride, pool_padding))

    def hybrid_forward(self, F, x):
        residual = self.skipbn(self.skip(x)) if self.skip is not None else x
        # residual first: with rep(x) + residual, oneDNN's subgraph pass (optimize_for 'MKLDNN') fuses the sum into
        # the depthwise conv of rep and fails shape inference ("Shape inconsistent, Provided = [C], inferred shape
        # = (C,1,3,3)"); this order partitions, and the sum is the same in IEEE arithmetic (tested in
        # tests/test_deploy.py). No upstream report found; MXNet's conv + sum fusion is apache/mxnet#12308.
        return residual + self.rep(x)


#: Accepted ``pool_padding`` values: 'symmetric' (timm, the MXNet seed; the default) and 'keras' (Keras's "same").
POOL_PADDINGS = ("symmetric", "keras")


class KerasSameMaxPool2D(nn.HybridBlock):
    """3x3 max pool with Keras's (TensorFlow's) "same" padding, for any input size.

    "same" pads ``pad_total = max((ceil(n / s) - 1) * s + 3 - n, 0)`` with ``pad_total // 2`` before and the rest
    after, so it is asymmetric (0 before, 1 after) when the side ``n`` is even at stride 2 (74 px at 299 input). Read
    from the far end, the windows always start one pixel before the edge; so this is the symmetric pad-1 pool applied
    to the image flipped in H and W, flipped back. It needs no input shape (hybridizes and exports), and the padding
    never wins the max (MXNet pads max pools with the lowest value). ``pooling_convention='same'`` raises in
    mxnet 1.9.1.
    """

    def __init__(self, strides: int = 2, **kwargs):
        super().__init__(**kwargs)
        if strides != 2:
            raise ValueError(f"KerasSameMaxPool2D supports stride 2 only, got {strides}")
        with self.name_scope():
            self.pool = nn.MaxPool2D(pool_size=3, strides=strides, padding=1)

    def hybrid_forward(self, F, x):
        return F.reverse(self.pool(F.reverse(x, axis=(2, 3))), axis=(2, 3))


def _max_pool(stride: int, pool_padding: str) -> nn.HybridBlock:
    if pool_padding == "symmetric":
        # The paper's 3x3 stride-2 pool with padding 1 on every side (timm, the MXNet seed).
        return nn.MaxPool2D(pool_size=3, strides=stride, padding=1)
    if pool_padding == "keras":
        return KerasSameMaxPool2D(stride)
    raise ValueError(f"pool_padding must be one of {', '.join(map(repr, POOL_PADDINGS))}, got {pool_padding!r}")


class _BlockOptions(TypedDict):
    """The keyword arguments every ``XceptionBlock`` of one network shares."""

    bn_epsilon: float
    bn_momentum: float
    pool_padding: str
    channel_multiple: int


class XceptionFeatures(nn.HybridBlock):
    """Stem, entry flow, middle flow and exit flow up to global average pooling: (N, 3, H, W) -> (N, filter_list[6])."""

    def __init__(self, filter_list: Sequence[int], in_channels: int = 3, bn_epsilon: float = 1e-3,
                 bn_momentum: float = 0.99, pool_padding: str = "symmetric", channel_multiple: int = 1, **kwargs):
        super().__init__(**kwargs)
        f = _check_filter_list(filter_list)
        w = (lambda c: round_up(c, channel_multiple))  # noqa: E731  (computed widths; f stays the paper's)
        bn = _BlockOptions(bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, pool_padding=pool_padding,
                           channel_multiple=channel_multiple)
        with self.name_scope():
            # Entry flow: the stem (3x3 convs, no padding, stride 2 then 1, each with BN and ReLU).
            self.conv1 = _conv(in_channels, w(f[0] // 2), 3, stride=2)
            self.bn1 = _batch_norm(w(f[0] // 2), bn_epsilon, bn_momentum)
            self.conv2 = _conv(w(f[0] // 2), w(f[0]), 3)
            self.bn2 = _batch_norm(w(f[0]), bn_epsilon, bn_momentum)
            # Entry flow: three strided residual blocks (the first starts without ReLU).
            self.block1 = XceptionBlock(f[0], f[1], 2, 2, start_with_relu=False, **bn)
            self.block2 = XceptionBlock(f[1], f[2], 2, 2, **bn)
            self.block3 = XceptionBlock(f[2], f[3], 2, 2, **bn)
            # Middle flow: eight identical blocks of three separable convs.
            self.block4 = XceptionBlock(f[3], f[3], 3, 1, **bn)
            self.block5 = XceptionBlock(f[3], f[3], 3, 1, **bn)
            self.block6 = XceptionBlock(f[3], f[3], 3, 1, **bn)
            self.block7 = XceptionBlock(f[3], f[3], 3, 1, **bn)
            self.block8 = XceptionBlock(f[3], f[3], 3, 1, **bn)
            self.block9 = XceptionBlock(f[3], f[3], 3, 1, **bn)
            self.block10 = XceptionBlock(f[3], f[3], 3, 1, **bn)
            self.block11 = XceptionBlock(f[3], f[3], 3, 1, **bn)
            # Exit flow: a strided block that widens last, then two separable convs, each with BN and ReLU.
            self.block12 = XceptionBlock(f[3], f[4], 2, 2, grow_first=False, **bn)
            self.conv3 = SeparableConv2D(w(f[4]), w(f[5]))
            self.bn3 = _batch_norm(w(f[5]), bn_epsilon, bn_momentum)
            self.conv4 = SeparableConv2D(w(f[5]), w(f[6]))
            self.bn4 = _batch_norm(w(f[6]), bn_epsilon, bn_momentum)
            self.pool = nn.GlobalAvgPool2D()
            self.flatten = nn.Flatten()

    def hybrid_forward(self, F, x):
        x = relu(F, self.bn1(self.conv1(x)))
        x = relu(F, self.bn2(self.conv2(x)))
        for i in range(1, 13):
            x = getattr(self, f"block{i}")(x)
        x = relu(F, self.bn3(self.conv3(x)))
        x = relu(F, self.bn4(self.conv4(x)))
        return self.flatten(self.pool(x))


class Xception(Padded, nn.HybridBlock):
    """Xception classifier: ``features`` (to the pooled ``filter_list[6]``-vector), dropout, ``fc`` (the output part).

    To fine-tune on other classes, keep ``features`` and replace the output part: ``net.reset_classifier(k)``.
    Inputs must be at least 71x71 (:data:`MIN_INPUT_SIZE`). ``pool_padding='keras'`` pads the stride-2 max pools
    as Keras does ("same": asymmetric on even sides), for Keras's weights; the default 'symmetric' is timm's.
    ``channel_multiple=N`` computes with every width rounded up to a multiple of N, the added channels zero
    (:mod:`xception_mx.padding`); ``filter_list`` and parameter counts stay the paper's.
    """

    def __init__(self, filter_list: Sequence[int] = PAPER_FILTER_LIST,
                 num_classes: int = 1000, dropout: float = 0.5, in_channels: int = 3, bn_epsilon: float = 1e-3,
                 bn_momentum: float = 0.99, pool_padding: str = "symmetric", channel_multiple: int = 1, **kwargs):
        super().__init__(**kwargs)
        self._twin_kwargs = dict(filter_list=filter_list, num_classes=num_classes, dropout=dropout,
                                 in_channels=in_channels, bn_epsilon=bn_epsilon, bn_momentum=bn_momentum,
                                 pool_padding=pool_padding)
        self.channel_multiple = channel_multiple
        self.filter_list = _check_filter_list(filter_list)
        self._features_width = round_up(self.filter_list[6], channel_multiple)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_classes = num_classes
        with self.name_scope():
            self.features = XceptionFeatures(self.filter_list, in_channels, bn_epsilon, bn_momentum, pool_padding,
                                             channel_multiple)
            self.dropout = nn.Dropout(dropout) if dropout > 0 else None
            self.fc = self._make_classifier(num_classes)

    def describe(self) -> str:
        return "filter list " + "x".join(map(str, self.filter_list))

    def _make_classifier(self, num_classes: int) -> nn.Dense:
        return nn.Dense(num_classes, in_units=self._features_width, weight_initializer=DENSE_INIT)

    def reset_classifier(self, num_classes: int, ctx=None) -> None:
        """Replace the output part with a freshly initialised ``num_classes``-way classifier."""
        self.num_classes = self._twin_kwargs["num_classes"] = num_classes
        with self.name_scope():
            self.fc = self._make_classifier(num_classes)
        self.fc.initialize(ctx=ctx)
        self.zero_added_channels()

    def forward(self, x, *args):
        # Checked here, not in hybrid_forward, because symbols carry no shapes.
        if isinstance(x, mx.nd.NDArray) and min(x.shape[2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"Xception needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        return super().forward(x, *args)

    def hybrid_forward(self, F, x):
        x = stable_name(F, self.features(x), FEATURES_NAME)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)


#: The exported symbol's pooled-features node (``pooled_features_output``), the same in every export: Gluon's own
#: names carry per-process counters (``xception0_xceptionfeatures0_flatten0_flatten0``).
FEATURES_NAME = "pooled_features"


def stable_name(F, x, name: str):
    """``x`` through an identity node named exactly ``name`` in symbols (a no-op on NDArrays)."""
    if F is mx.nd:
        return x
    with mx.name.NameManager():  # outside the block's prefix scope
        return F.identity(x, name=name)


def count_parameters(net: nn.Block) -> tuple[int, int]:
    """(trainable, total) parameter counts at the paper's widths (whatever ``channel_multiple`` computes with);
    total includes BN running statistics."""
    if getattr(net, "channel_multiple", 1) > 1:
        grad_req = {p.name: p.grad_req for p in net.collect_params().values()}
        twin = net.canonical_twin()
        for p in twin.collect_params().values():
            p.grad_req = grad_req.get(p.name, p.grad_req)
        net = twin
    trainable = total = 0
    for param in net.collect_params().values():
        size = 1
        for dim in param.shape:
            size *= dim
        total += size
        if param.grad_req != "null":
            trainable += size
    return trainable, total
