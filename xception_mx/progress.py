"""Progress of an epoch (a tqdm bar on a terminal, else periodic log lines with img/s and ETA) and the stop flag
that turns SIGINT/SIGTERM into "finish this step, write a checkpoint, stop"."""
from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Iterable, Iterator

from .metrics import Accumulator

__all__ = ["Progress", "StopFlag", "lr_range"]

log = logging.getLogger("xception_mx.train")


def lr_range(first: float | None, last: float | None) -> str:
    """An epoch's learning rate for its log line: ``0.05->0.002437`` from its first step to its last, one value when
    they agree."""
    if first is None or last is None or f"{first:.4g}" == f"{last:.4g}":
        return "n/a" if first is None and last is None else f"{first if first is not None else last:.4g}"
    return f"{first:.4g}->{last:.4g}"


class Progress:
    """Batches ``start..total`` of one epoch."""

    def __init__(self, epoch: int, total: int, batch_size: int, interval: int, start: int = 0):
        self.epoch, self.total, self.batch_size, self.interval = epoch, total, batch_size, interval
        self.start_time = time.time()
        self.done = self.first = start
        self.bar = None
        self.rate = 0.0
        self.data_wait = 0.0  # seconds spent waiting for the next batch (:meth:`timed`)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit="batch", leave=False)

    def update(self, lr: float, acc: Accumulator | None = None, grad_norm: float | None = None) -> None:
        """One more batch; with ``acc`` (the figures read back at the log interval) also the loss and top-1."""
        self.done += 1
        elapsed = max(time.time() - self.start_time, 1e-9)
        rate = (self.done - self.first) * self.batch_size / elapsed
        eta = (self.total - self.done) * self.batch_size / max(rate, 1e-9)
        norm = "" if grad_norm is None else f" grad-norm {grad_norm:.3g}"
        data = 100 * self.data_wait / elapsed
        if self.bar is not None:
            if acc is not None:
                self.bar.set_postfix(loss=f"{acc.loss:.4f}", top1=f"{acc.top(1):.3f}", img_s=f"{rate:.1f}",
                                     data=f"{data:.0f}%", lr=f"{lr:.3g}", refresh=False)
            self.bar.update(1)
        if acc is not None:  # under a bar, train.log still gets the line (the terminal shows the bar instead)
            log.info("epoch %d [%d/%d] loss %.4f top-1 %.4f lr %.4g%s %.1f img/s data %.0f%% ETA %ds", self.epoch,
                     self.done, self.total, acc.loss, acc.top(1), lr, norm, rate, data, eta,
                     extra={"file_only": self.bar is not None})
        self.rate = rate

    def timed(self, batches: Iterable) -> Iterator:
        """``batches``, adding the time each one took to arrive to :attr:`data_wait` (with MXNet's threaded engine
        that includes waiting for the step that still reads the buffer it reuses)."""
        source = iter(batches)
        while True:
            start = time.time()
            try:
                batch = next(source)
            except StopIteration:
                return
            self.data_wait += time.time() - start
            yield batch

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopFlag:
    """Remembers SIGINT/SIGTERM (inside a ``with`` block) so the loop can finish its step and write a checkpoint."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing the current step, then writing a checkpoint",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"
