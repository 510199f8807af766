"""The one user-facing error type: a one-line message and the exit code the console scripts return.

Imports nothing heavy, so every module (and ``im2rec_tools``) can raise it before MXNet is loaded.
"""
from __future__ import annotations

__all__ = ["UserError", "RunFailed", "Interrupted", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """Bad input (a flag, a file, a config key): one line that names the problem and what to do. Exit 2."""

    exit_code = EXIT_BAD_INPUT


class RunFailed(UserError):
    """A run that started and cannot go on (e.g. a non-finite loss). Exit 1."""

    exit_code = EXIT_FAILED


class Interrupted(UserError):
    """SIGINT/SIGTERM: what was saved and how to continue. Exit 130."""

    exit_code = EXIT_INTERRUPTED
