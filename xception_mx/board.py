"""TensorBoard event files (``--tensorboard DIR``) through tensorboardX, which writes them with no framework
dependency (MXNet's own mxboard is unmaintained and fails to import with current protobuf: awslabs/mxboard#40).

The step axis is the optimizer's update count, which a checkpoint restores exactly. A resumed run opens its writer
with ``purge_step`` = that count + 1, so TensorBoard hides whatever a crashed run logged after its last checkpoint:
no point is duplicated or rewound. Rank 0 alone writes.
"""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import threading
import weakref
from collections.abc import Callable

from .errors import UserError
from .fileio import write_errors

__all__ = ["Board", "check_available"]

EXTRA_HINT = "pip install 'xception_mx[tensorboard]' (tensorboardX), or drop --tensorboard"


def check_available() -> None:
    """One line, before anything is built, when tensorboardX is missing."""
    if importlib.util.find_spec("tensorboardX") is None:
        raise UserError(f"--tensorboard needs the 'tensorboard' extra, which is not installed: {EXTRA_HINT}")


#: tensorboardX writes in a thread: a full disk kills it with a traceback, after which every write blocks on its
#: queue forever (and so does close). Its exception is kept here, keyed by the thread, and raised in the run.
_FAILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_previous_hook = threading.excepthook


def _keep_writer_failures(args) -> None:
    if type(args.thread).__name__ == "_EventLoggerThread" and isinstance(args.exc_value, OSError):
        _FAILED[args.thread] = args.exc_value
        return
    _previous_hook(args)


class Board:
    """Scalars on the update axis; does nothing when ``folder`` is None (off, or not rank 0). A failed write (a full
    disk) is one line naming the folder and ``then()`` (what to run next)."""

    def __init__(self, folder: str | None, config_text: str = "", resumed_at: int | None = None,
                 then: Callable[[], str] | str = "free space and run the command again"):
        self.writer, self.folder, self.then = None, folder or "", then
        if folder is None:
            return
        threading.excepthook = _keep_writer_failures
        from tensorboardX import SummaryWriter

        purge = None if resumed_at is None else resumed_at + 1
        try:
            self.writer = SummaryWriter(logdir=folder, purge_step=purge, flush_secs=60)
        except OSError as exc:
            raise UserError(f"--tensorboard {folder}: cannot write event files there ({exc.strerror or exc}); "
                            f"give a writable folder") from None
        if config_text:
            self.writer.add_text("config", f"```\n{config_text}\n```", global_step=resumed_at or 0)

    def scalars(self, step: int, values: dict) -> None:
        """``values``: tag -> number (None values are left out)."""
        writer = self.writer
        if writer is None:
            return
        with self._writing():
            for tag, value in values.items():
                self._raise_if_stopped()  # before each event: a dead writer's queue fills, then blocks
                if value is not None:
                    writer.add_scalar(tag, float(value), global_step=step)

    def flush(self) -> None:
        writer = self.writer
        if writer is not None:
            with self._writing():
                self._raise_if_stopped()
                writer.flush()

    def close(self) -> None:
        writer = self.writer
        if writer is not None:
            with self._writing():
                self._raise_if_stopped()
                writer.close()
            self.writer = None

    @contextlib.contextmanager
    def _writing(self):
        """A failed write gives up the writer (silenced: its atexit close would flush into the full disk again) and
        becomes one line (:func:`write_errors`)."""
        with write_errors(self.folder, "TensorBoard event files", self.then):
            try:
                yield
            except OSError:
                events = getattr(getattr(self.writer, "file_writer", None), "event_writer", None)
                if events is not None:
                    events._closed = True
                self.writer = None
                raise

    def _raise_if_stopped(self) -> None:
        """The writer thread's failure, once it has died (writing on would block on its full queue forever)."""
        events = getattr(getattr(self.writer, "file_writer", None), "event_writer", None)
        worker = getattr(events, "_worker", None)
        if worker is not None and not worker.is_alive():
            raise _FAILED.pop(worker, None) or OSError(errno.EIO, "the TensorBoard writer thread stopped")
