"""Atomic file writes (write a temporary file in the target's folder, fsync it, rename it, fsync the folder).

Every writer of the package and of ``im2rec_tools`` goes through here, so a crash or a full disk never leaves a
half-written file under a final name. Temporary names are ``.<name>.<random>.tmp<ext>`` beside the target.
Imports no MXNet.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

from .errors import RunFailed

__all__ = ["fsync_dir", "atomic_replace", "atomic_paths", "atomic_path", "atomic_write_text", "atomic_write_bytes",
           "append_synced", "read_text", "printable_path", "remove_stale_temporaries", "file_crc32", "write_errors",
           "size_text", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    """fsync a folder so a rename inside it survives a power cut (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_replace(tmp_path: str, final_path: str) -> None:
    """fsync ``tmp_path``, rename it over ``final_path`` (same folder), then fsync the folder."""
    with open(tmp_path, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, final_path)
    fsync_dir(os.path.dirname(os.path.abspath(final_path)))


def is_temporary(name: str) -> bool:
    """A temporary name of this module (``.<name>.<random>.tmp<ext>``) or of ``checkpoint.export_atomic``."""
    return name.startswith(".") and (name.endswith(TMP_SUFFIX) or TMP_SUFFIX + "." in name)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete this project's temporary files and folders in ``folder`` (left by a SIGKILL or a power cut).

    Call it only while no other writer uses the folder (the trainer holds the run folder's lock).
    """
    import shutil

    removed = []
    for entry in os.scandir(folder) if os.path.isdir(folder) else []:
        if is_temporary(entry.name):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.remove(entry.path)
            removed.append(entry.name)
    return removed


def _tmp_for(final_path: str) -> str:
    folder, base = os.path.split(os.path.abspath(final_path))
    ext = os.path.splitext(base)[1]  # kept last: writers such as matplotlib pick the format from it
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=TMP_SUFFIX + ext, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; final files follow the umask like any other file
    return tmp


@contextlib.contextmanager
def atomic_paths(*final_paths: str) -> Iterator[list[str]]:
    """Yield temporary paths for ``final_paths``; on success they replace the finals in the order given.

    On an exception (disk full, a signal) the temporaries are removed and the finals are untouched.
    """
    tmps: list[str] = []
    try:
        for path in final_paths:
            tmps.append(_tmp_for(path))
        yield list(tmps)
        for tmp, final in zip(tmps, final_paths):
            atomic_replace(tmp, final)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_path(final_path: str) -> Iterator[str]:
    """One-file form of :func:`atomic_paths`."""
    with atomic_paths(final_path) as (tmp,):
        yield tmp


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_synced(path: str, text: str) -> None:
    """Append ``text`` and fsync (an append-only log: a crash can cut only its last line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_text(path: str, what: str, encoding: str = "utf-8") -> str:
    """The text of ``path``; one line naming ``what`` and the file when it is not UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        from .errors import UserError

        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None


def printable_path(path: str) -> str:
    """A path for a message: as is when it is valid text, else its bytes escaped (a non-UTF-8 name)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return repr(os.fsencode(path))[2:-1]


def file_crc32(path: str, chunk: int = 1 << 22) -> int:
    """CRC-32 of a file's bytes (zlib's: fast, and enough to detect accidental corruption)."""
    import zlib

    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            crc = zlib.crc32(block, crc)
    return crc


#: errno values of a write that failed for want of room or a working disk (others are bugs or bad input).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)


def size_text(n: float) -> str:
    """``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextlib.contextmanager
def write_errors(folder: str, what: str, then: str | Callable[[], str] = "free space and run the command again"):
    """A failed write in ``folder`` (ENOSPC and kin, or MXNet's "Write incomplete" for the same) as one
    :class:`RunFailed` line naming the folder, the free space and ``then`` (or what it returns, asked only then).
    Other errors pass through."""
    try:
        yield
    except Exception as exc:
        mxnet_error = type(exc).__name__ == "MXNetError"  # checked by name: this module imports no MXNet
        if not (mxnet_error or (isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS)):
            raise
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
        if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or free < 64 << 20:
            reason = "disk full"
        else:
            reason = "could not write (" + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120] + ")"
        next_step = then() if callable(then) else then
        raise RunFailed(f"{reason} while writing {what} in {folder} ({size_text(free)} free): {next_step}") from None
