"""Exponential moving average (EMA/Polyak) of every parameter, BatchNorm statistics included.

The averages are what evaluation and the export use; ``applied()`` swaps them in for a ``with`` block and swaps the
live weights back on exit, so what a checkpoint saves never depends on which way round the weights currently are.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mxnet as mx

__all__ = ["EMA"]


class EMA:
    """Averages of ``named`` parameters, kept on ``ctx`` (the first device)."""

    def __init__(self, named: dict, decay: float, ctx: mx.Context):
        self.named, self.decay, self.ctx = named, decay, ctx
        self.shadow = {name: p.data(ctx).copy() for name, p in named.items()}
        self._applied = False

    def update(self) -> None:
        for name, p in self.named.items():
            shadow = self.shadow[name]
            shadow[:] = self.decay * shadow + (1.0 - self.decay) * p.data(self.ctx)

    def arrays(self) -> dict[str, mx.nd.NDArray]:
        """The averages by structured name (outside ``applied()`` only)."""
        assert not self._applied, "EMA.arrays() inside EMA.applied(): the live weights sit in the shadow"
        return dict(self.shadow)

    def load(self, arrays: dict[str, mx.nd.NDArray]) -> None:
        for name in self.named:
            self.shadow[name] = arrays[name].as_in_context(self.ctx).copy()

    def _swap(self) -> None:
        for name, p in self.named.items():
            live = p.data(self.ctx).copy()
            p.set_data(self.shadow[name])
            self.shadow[name] = live

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The network holds the averages inside the block, its live weights again after it."""
        self._swap()
        self._applied = True
        try:
            yield
        finally:
            self._applied = False
            self._swap()
