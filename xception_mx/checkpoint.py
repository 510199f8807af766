"""Checkpoint files that need MXNet: the export that ``score.py`` loads and the state arrays of an exact resume.

A checkpoint is written export, state arrays, manifest (last; see ``runfolder`` for the layout), each atomically.
The state is an ``mx.nd.save`` file (no pickle): raw weights (``param/``), optimizer states (``optim/``, see
``optim_state``) and EMA weights (``ema/``), all by structured name.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import mxnet as mx
from mxnet import gluon

from .fileio import atomic_path, atomic_replace
from .runfolder import RunFolder
from .weights import read_arrays

__all__ = ["export_atomic", "save_checkpoint", "load_state"]


def export_atomic(net: gluon.HybridBlock, model_prefix: str, epoch: int) -> None:
    """``net.export`` into a temporary folder beside the targets, then fsync + rename each file into place."""
    folder, base = os.path.split(os.path.abspath(model_prefix))
    tmp_dir = tempfile.mkdtemp(prefix=f".{base}-export-", suffix=".tmp", dir=folder)
    try:
        net.export(os.path.join(tmp_dir, "net"), epoch=epoch)
        atomic_replace(os.path.join(tmp_dir, "net-symbol.json"), f"{model_prefix}-symbol.json")
        atomic_replace(os.path.join(tmp_dir, f"net-{epoch:04d}.params"), f"{model_prefix}-{epoch:04d}.params")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_checkpoint(folder: RunFolder, epoch: int | None, arrays: dict, manifest: dict,
                    export_net: gluon.HybridBlock | None = None) -> None:
    """Write the export (unless ``export_net`` is None), the state arrays and, last, the manifest.

    ``epoch=None`` writes the mid-epoch checkpoint.
    """
    if export_net is not None:
        export_atomic(export_net, folder.model_prefix, epoch)
    with atomic_path(folder.files(epoch).state) as tmp:
        mx.nd.save(tmp, {k: v.as_in_context(mx.cpu()) for k, v in arrays.items()})
    folder.write_manifest(epoch, manifest)


def load_state(folder: RunFolder, epoch: int | None) -> dict[str, mx.nd.NDArray]:
    """The state arrays of epoch ``epoch`` (None: the mid-epoch checkpoint)."""
    return read_arrays(folder.files(epoch).state, "checkpoint state")
