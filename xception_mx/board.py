"""TensorBoard event files (``--tensorboard DIR``) through tensorboardX, which writes them with no framework
dependency (MXNet's own mxboard is unmaintained and fails to import with current protobuf: awslabs/mxboard#40).

The step axis is the optimizer's update count, which a checkpoint restores exactly. A resumed run opens its writer
with ``purge_step`` = that count + 1, so TensorBoard hides whatever a crashed run logged after its last checkpoint:
no point is duplicated or rewound. Rank 0 alone writes.
"""
from __future__ import annotations

import importlib.util

from .errors import UserError

__all__ = ["Board", "check_available"]

EXTRA_HINT = "pip install 'xception_mx[tensorboard]' (tensorboardX), or drop --tensorboard"


def check_available() -> None:
    """One line, before anything is built, when tensorboardX is missing."""
    if importlib.util.find_spec("tensorboardX") is None:
        raise UserError(f"--tensorboard needs the 'tensorboard' extra, which is not installed: {EXTRA_HINT}")


class Board:
    """Scalars on the update axis; does nothing when ``folder`` is None (off, or not rank 0)."""

    def __init__(self, folder: str | None, config_text: str = "", resumed_at: int | None = None):
        self.writer = None
        if folder is None:
            return
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
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
