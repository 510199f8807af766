"""Checkpoint files that need MXNet: the export that ``score.py`` loads and the state arrays of an exact resume.

``RunWriter`` writes a checkpoint in this order: export, state arrays, manifest (last; see ``runfolder`` for the
layout), each atomically.
The state is an ``mx.nd.save`` file (no pickle): raw weights (``param/``), optimizer states (``optim/``, see
``optim_state``) and EMA weights (``ema/``), all by structured name. The manifest records the state file's name,
size and CRC-32, so a manifest is never paired with another checkpoint's arrays and corruption is named on load.
Disk full (or any failed write) while saving is one line naming the folder and its free space; what was saved
before stays complete.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
import time

import mxnet as mx
from mxnet import gluon

from .errors import UserError
from .fileio import atomic_path, atomic_replace, file_crc32, write_errors
from .manifest import Manifest, StateFile
from .runfolder import RunFolder
from .weights import read_arrays

__all__ = ["export_atomic", "without_amp_casts", "save_state", "load_state", "disk_errors"]


@contextlib.contextmanager
def disk_errors(run: RunFolder, what: str):
    """:func:`fileio.write_errors` in a run folder: the line says what to run next (the folder's real checkpoints
    decide: resume, or start again)."""
    with write_errors(run.folder, what, f"free space, then {run.resume_hint()}"):
        yield


def export_atomic(net: gluon.HybridBlock, model_prefix: str, epoch: int) -> None:
    """``net.export`` into a temporary folder beside the targets, then fsync + rename each file into place."""
    folder, base = os.path.split(os.path.abspath(model_prefix))
    tmp_dir = tempfile.mkdtemp(prefix=f".{base}-export-", suffix=".tmp", dir=folder)
    try:
        net.export(os.path.join(tmp_dir, "net"), epoch=epoch, remove_amp_cast=False)
        without_amp_casts(net._cached_graph[1]).save(os.path.join(tmp_dir, "net-symbol.json"), remove_amp_cast=False)
        atomic_replace(os.path.join(tmp_dir, "net-symbol.json"), f"{model_prefix}-symbol.json")
        atomic_replace(os.path.join(tmp_dir, f"net-{epoch:04d}.params"), f"{model_prefix}-{epoch:04d}.params")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def without_amp_casts(symbol: mx.sym.Symbol) -> mx.sym.Symbol:
    """``symbol`` without AMP's casts, as ``Symbol.save``/``tojson`` write it by default; but those never free the
    stripped copy they make (``MXSymbolRemoveAmpCast``'s handle: +0.27 MiB per epoch's export of the tiny test model
    in MXNet 1.9.1; upstream: none found): here the copy is a ``Symbol``, freed with it."""
    handle = mx.base.SymbolHandle()
    mx.base.check_call(mx.base._LIB.MXSymbolRemoveAmpCast(symbol.handle, ctypes.byref(handle)))
    return mx.sym.Symbol(handle)


def save_state(folder: RunFolder, epoch: int | None, arrays: dict, manifest: Manifest) -> None:
    """Write the state arrays, then the manifest naming them (its ``files`` filled in here).

    ``epoch=None`` writes the mid-epoch checkpoint: a new state file, its manifest, then the old state files go.
    """
    token = f"{time.time_ns():x}" if epoch is None else None
    state = folder.files(epoch, token).state
    with atomic_path(state) as tmp:
        mx.nd.save(tmp, {k: v.as_in_context(mx.cpu()) for k, v in arrays.items()})
    manifest.files = StateFile(os.path.getsize(state), file_crc32(state), token)
    folder.write_manifest(epoch, manifest)
    if epoch is None:
        folder.drop_partial_states(keep=state)


def load_state(folder: RunFolder, epoch: int | None, manifest: Manifest | None = None) -> dict[str, mx.nd.NDArray]:
    """The state arrays of epoch ``epoch`` (None: the mid-epoch checkpoint), checked against the manifest's CRC
    (read from the folder when not given)."""
    if manifest is None:
        manifest = folder.partial_manifest() if epoch is None else folder.manifest(epoch)
        if manifest is None:
            raise UserError(f"no mid-epoch checkpoint in {folder.folder} (prefix {folder.prefix!r})")
    path = folder.state_file(epoch, manifest)
    expected = manifest.files.crc32
    if expected is not None and os.path.isfile(path) and file_crc32(path) != expected:
        raise UserError(f"{path} is corrupt (its CRC-32 differs from the one its manifest recorded): resume from "
                        f"another epoch with --resume N")
    return read_arrays(path, "checkpoint state")
