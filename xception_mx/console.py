"""What every console script shares: the one-line argument parser, ``run_cli`` and logging set-up.

Imports no MXNet: ``train_xception.py`` must choose MXNet's engine before MXNet loads.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, Interrupted, UserError

__all__ = ["OneLineParser", "run_cli", "setup_logging", "log_to_file"]


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one :class:`UserError` line (not usage + error + exit)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def run_cli(prog: str, body: Callable[[], int | None], interrupted_hint: str = "") -> int:
    """Run ``body()``; a known failure becomes ``prog: error: <one line>`` on stderr and its exit code."""
    try:
        return body() or 0
    except Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # unwritable output, disk full, a file that vanished
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupted_hint if interrupted_hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED


def setup_logging(verbose: bool = False) -> None:
    """``HH:MM:SS message`` lines on stdout for the ``xception_mx`` loggers."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("xception_mx")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


class _QuietFileHandler(logging.FileHandler):
    """A log file that, when a write fails (a full disk), stops writing instead of printing a traceback per line:
    the failure itself reaches the user as one line from the code that hit it."""

    def handleError(self, record):
        logging.getLogger("xception_mx").removeHandler(self)


_file_handler: logging.Handler | None = None


def log_to_file(path: str) -> None:
    """Also write the ``xception_mx`` log to ``path`` (replacing an earlier file handler of this process)."""
    global _file_handler
    root = logging.getLogger("xception_mx")
    if _file_handler is not None:
        root.removeHandler(_file_handler)
        _file_handler.close()
    _file_handler = _QuietFileHandler(path)
    _file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(_file_handler)
