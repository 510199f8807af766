"""Aligned Xception (DeepLab v3+, Chen et al. 2018): xception41, xception65, xception71, as block tables.

A variant is data (its table is in ``variants.ALIGNED_CONFIGS``): its entry-flow blocks (width, stride) and its
middle-flow repeat count; the exit flow is shared. One builder turns a table into a network. What differs from the
paper's Xception: every separable conv has BatchNorm between its depthwise and pointwise convs, strided separable
convs replace the max pools, every 3x3 conv is padded by 1 (the stem too), and the last block has no shortcut and a
ReLU after each BatchNorm.

Child names follow timm's ``xception_aligned`` state dict under ``features.`` (``stem.0.conv``, ``stem.0.bn``,
``blocks.3.stack.conv2.conv_dw``, ``bn_dw``, ``conv_pw``, ``bn_pw``, ``blocks.3.shortcut.conv``/``.bn``); the
classifier is ``fc`` (timm's ``head.fc``), so importing timm weights is a rename.
"""
from __future__ import annotations

from dataclasses import dataclass

from mxnet.gluon import nn

from .model import CONV_INIT, DENSE_INIT, FEATURES_NAME, relu, stable_name
from .padding import Padded, round_up

__all__ = ["BlockSpec", "block_table", "XceptionAligned", "EXIT_FLOW"]


@dataclass(frozen=True)
class BlockSpec:
    """One block: the widths of its three separable convs, the last one's stride, whether it has a shortcut (a
    1x1 conv + BN when the shape changes), and whether ReLU comes before each separable conv (else after each BN)."""
    widths: tuple[int, int, int]
    stride: int = 1
    skip: bool = True
    relu_first: bool = True


#: The shared exit flow: a strided block widening to 1024, then 1536-1536-2048 without a shortcut.
EXIT_FLOW = (BlockSpec((728, 1024, 1024), 2), BlockSpec((1536, 1536, 2048), 1, skip=False, relu_first=False))
STEM_WIDTHS = (32, 64)
MIDDLE_WIDTH = 728


def block_table(entry, middle: int) -> list[BlockSpec]:
    """Entry blocks (width, stride), ``middle`` blocks of 728, then the exit flow (the registered variants' tables:
    ``variants.ALIGNED_CONFIGS``)."""
    blocks = [BlockSpec((w, w, w), s) for w, s in entry]
    blocks += [BlockSpec((MIDDLE_WIDTH,) * 3) for _ in range(middle)]
    return blocks + list(EXIT_FLOW)


class _ConvBN(nn.HybridBlock):
    """conv (no bias) + BatchNorm (+ ReLU): timm's ConvNormAct, children ``conv`` and ``bn``."""

    def __init__(self, in_channels, channels, kernel, stride, bn_epsilon, bn_momentum, relu, **kwargs):
        super().__init__(**kwargs)
        self.relu = relu
        with self.name_scope():
            self.conv = nn.Conv2D(channels, kernel, strides=stride, padding=kernel // 2, use_bias=False,
                                  in_channels=in_channels, weight_initializer=CONV_INIT)
            self.bn = nn.BatchNorm(in_channels=channels, epsilon=bn_epsilon, momentum=bn_momentum)

    def hybrid_forward(self, F, x):
        x = self.bn(self.conv(x))
        return relu(F, x) if self.relu else x


class _SeparableConvBN(nn.HybridBlock):
    """Depthwise 3x3 (stride on it) + BN (+ ReLU), pointwise 1x1 + BN (+ ReLU)."""

    def __init__(self, in_channels, channels, stride, bn_epsilon, bn_momentum, relu_inside, **kwargs):
        super().__init__(**kwargs)
        self.relu_inside = relu_inside
        with self.name_scope():
            self.conv_dw = nn.Conv2D(in_channels, 3, strides=stride, padding=1, groups=in_channels, use_bias=False,
                                     in_channels=in_channels, weight_initializer=CONV_INIT)
            self.bn_dw = nn.BatchNorm(in_channels=in_channels, epsilon=bn_epsilon, momentum=bn_momentum)
            self.conv_pw = nn.Conv2D(channels, 1, use_bias=False, in_channels=in_channels,
                                     weight_initializer=CONV_INIT)
            self.bn_pw = nn.BatchNorm(in_channels=channels, epsilon=bn_epsilon, momentum=bn_momentum)

    def hybrid_forward(self, F, x):
        x = self.bn_dw(self.conv_dw(x))
        if self.relu_inside:
            x = relu(F, x)
        x = self.bn_pw(self.conv_pw(x))
        return relu(F, x) if self.relu_inside else x


class _Stack(nn.HybridBlock):
    """The three separable convs of a block (children ``conv1``..``conv3``), ReLU before each when relu_first."""

    def __init__(self, in_channels, spec: BlockSpec, bn_epsilon, bn_momentum, multiple: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.relu_first = spec.relu_first
        widths = tuple(round_up(c, multiple) for c in (in_channels, *spec.widths))
        with self.name_scope():
            for i in range(3):
                setattr(self, f"conv{i + 1}", _SeparableConvBN(
                    widths[i], widths[i + 1], spec.stride if i == 2 else 1, bn_epsilon, bn_momentum,
                    relu_inside=not spec.relu_first))

    def hybrid_forward(self, F, x):
        for conv in (self.conv1, self.conv2, self.conv3):
            x = conv(relu(F, x) if self.relu_first else x)
        return x


class _AlignedBlock(nn.HybridBlock):
    """stack(x) + shortcut(x): the shortcut is the block's input (before the first ReLU), through a 1x1 conv + BN
    when the width or the stride changes; no sum at all when the spec has no skip."""

    def __init__(self, in_channels: int, spec: BlockSpec, bn_epsilon, bn_momentum, multiple: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.skip = spec.skip
        with self.name_scope():
            self.stack = _Stack(in_channels, spec, bn_epsilon, bn_momentum, multiple)
            needs_conv = spec.skip and (spec.widths[-1] != in_channels or spec.stride != 1)  # the paper's widths
            self.shortcut = _ConvBN(round_up(in_channels, multiple), round_up(spec.widths[-1], multiple), 1,
                                    spec.stride, bn_epsilon, bn_momentum, relu=False) if needs_conv else None

    def hybrid_forward(self, F, x):
        out = self.stack(x)
        if not self.skip:
            return out
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class _AlignedFeatures(nn.HybridBlock):
    def __init__(self, blocks: list[BlockSpec], in_channels, bn_epsilon, bn_momentum, multiple: int = 1, **kwargs):
        super().__init__(**kwargs)
        stem = tuple(round_up(c, multiple) for c in STEM_WIDTHS)
        with self.name_scope():
            self.stem = nn.HybridSequential()
            self.stem.add(_ConvBN(in_channels, stem[0], 3, 2, bn_epsilon, bn_momentum, relu=True),
                          _ConvBN(stem[0], stem[1], 3, 1, bn_epsilon, bn_momentum, relu=True))
            self.blocks = nn.HybridSequential()
            width = STEM_WIDTHS[1]
            for spec in blocks:
                self.blocks.add(_AlignedBlock(width, spec, bn_epsilon, bn_momentum, multiple))
                width = spec.widths[-1]
            self.pool = nn.GlobalAvgPool2D()
            self.flatten = nn.Flatten()

    def hybrid_forward(self, F, x):
        return self.flatten(self.pool(self.blocks(self.stem(x))))


class XceptionAligned(Padded, nn.HybridBlock):
    """An aligned Xception classifier: ``features`` (to the pooled 2048-vector), dropout, ``fc``.

    Built from a block table (:func:`block_table`); the registered names are in ``variants.ALIGNED_CONFIGS``.
    ``channel_multiple=N`` computes with widths rounded up to a multiple of N (:mod:`xception_mx.padding`).
    """

    def __init__(self, blocks: list[BlockSpec], num_classes: int = 1000, dropout: float = 0.5, in_channels: int = 3,
                 bn_epsilon: float = 1e-3, bn_momentum: float = 0.99, name: str = "xception_aligned",
                 channel_multiple: int = 1, **kwargs):
        super().__init__(**kwargs)
        self._twin_kwargs = dict(blocks=blocks, num_classes=num_classes, dropout=dropout, in_channels=in_channels,
                                 bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, name=name)
        self.channel_multiple = channel_multiple
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.arch, self.num_classes, self.blocks = name, num_classes, list(blocks)
        self.num_features = self.blocks[-1].widths[-1]
        with self.name_scope():
            self.features = _AlignedFeatures(self.blocks, in_channels, bn_epsilon, bn_momentum, channel_multiple)
            self.dropout = nn.Dropout(dropout) if dropout > 0 else None
            self.fc = self._make_classifier(num_classes)

    def describe(self) -> str:
        return f"aligned, {len(self.blocks)} blocks"

    def _make_classifier(self, num_classes: int) -> nn.Dense:
        return nn.Dense(num_classes, in_units=round_up(self.num_features, self.channel_multiple),
                        weight_initializer=DENSE_INIT)

    def reset_classifier(self, num_classes: int, ctx=None) -> None:
        """Replace the output part with a freshly initialised ``num_classes``-way classifier."""
        self.num_classes = self._twin_kwargs["num_classes"] = num_classes
        with self.name_scope():
            self.fc = self._make_classifier(num_classes)
        self.fc.initialize(ctx=ctx)
        self.zero_added_channels()

    def hybrid_forward(self, F, x):
        x = stable_name(F, self.features(x), FEATURES_NAME)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)
