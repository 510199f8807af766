"""Checkpoints: atomic files, MXNet exports for scoring, and a pickle-free training state for exact resumes.

An epoch-E checkpoint in ``OUTPUT_DIR`` is:

- ``PREFIX-symbol.json`` + ``PREFIX-EEEE.params``: MXNet's export format (what ``score.py`` and
  ``mx.gluon.SymbolBlock.imports`` load); the weights evaluation used (the EMA weights when EMA is on).
- ``PREFIX-EEEE.state.params``: an NDArray file (``mx.nd.save``, no pickle) with the raw weights (``param/``),
  optimizer states (``optim/``) and EMA weights (``ema/``).
- ``PREFIX-EEEE.state.json``: the manifest: epoch, optimizer update counters, seeds, resolved config, metrics, best
  epoch, and the layout of the optimizer states. Written last: a checkpoint without it is incomplete and ignored.

``Trainer.save_states`` would pickle the optimizer (and with it the LR scheduler, which is how GluonCV's resume
freezes the LR on another device list, apache/mxnet#17357); we store the same state as NDArrays and JSON instead.
Every file is written to a temporary name in the same folder, flushed, fsynced and renamed.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterable

import mxnet as mx
from mxnet import gluon

__all__ = ["CheckpointError", "atomic_write_text", "atomic_replace", "checkpoint_paths", "list_epochs",
           "latest_epoch", "save_checkpoint", "load_manifest", "load_partial_manifest", "load_state_arrays", "export_atomic",
           "optimizer_state_arrays", "restore_optimizer_state", "remove_epoch"]


class CheckpointError(RuntimeError):
    """A missing or unusable checkpoint; the message is one line for the user."""


def _fsync_dir(path: str) -> None:
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
    """fsync ``tmp_path`` and rename it over ``final_path`` (same folder), then fsync the folder."""
    with open(tmp_path, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, final_path)
    _fsync_dir(os.path.dirname(os.path.abspath(final_path)))


def _tmp_name(final_path: str) -> str:
    folder, base = os.path.split(os.path.abspath(final_path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def atomic_write_text(path: str, text: str) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        atomic_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_nd_save(path: str, arrays: dict) -> None:
    tmp = _tmp_name(path)
    try:
        mx.nd.save(tmp, arrays)
        atomic_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_paths(output_dir: str, prefix: str, epoch: int | None) -> dict[str, str]:
    """The files of epoch ``epoch``'s checkpoint; ``None`` names the mid-epoch one a signal writes."""
    base = os.path.join(output_dir, prefix)
    tag = "partial" if epoch is None else f"{epoch:04d}"
    return {"symbol": f"{base}-symbol.json", "export": f"{base}-{tag}.params",
            "state": f"{base}-{tag}.state.params", "manifest": f"{base}-{tag}.state.json"}


def list_epochs(output_dir: str, prefix: str) -> list[int]:
    """Epochs with a complete checkpoint (manifest and the files it names), ascending."""
    pattern = re.compile(re.escape(prefix) + r"-(\d{4,})\.state\.json$")
    epochs = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), glob.escape(prefix) + "-*.state.json")):
        match = pattern.search(os.path.basename(path))
        if not match:
            continue
        epoch = int(match.group(1))
        paths = checkpoint_paths(output_dir, prefix, epoch)
        if all(os.path.isfile(paths[k]) for k in ("state", "export", "symbol")):
            epochs.append(epoch)
    return sorted(epochs)


def latest_epoch(output_dir: str, prefix: str) -> int | None:
    epochs = list_epochs(output_dir, prefix)
    return epochs[-1] if epochs else None


def export_atomic(net: gluon.HybridBlock, output_dir: str, prefix: str, epoch: int) -> None:
    """``net.export`` into a temporary folder beside the targets, then fsync + rename each file into place."""
    paths = checkpoint_paths(output_dir, prefix, epoch)
    tmp_dir = tempfile.mkdtemp(prefix=f".{prefix}-export-", dir=output_dir)
    try:
        net.export(os.path.join(tmp_dir, "net"), epoch=epoch)
        atomic_replace(os.path.join(tmp_dir, "net-symbol.json"), paths["symbol"])
        atomic_replace(os.path.join(tmp_dir, f"net-{epoch:04d}.params"), paths["export"])
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _flatten_state(state: Any, key: str, out: dict) -> Any:
    """Optimizer state (NDArray / nested tuple / None) -> layout JSON, with arrays put into ``out``."""
    if state is None:
        return None
    if isinstance(state, mx.nd.NDArray):
        out[key] = state.as_in_context(mx.cpu())
        return key
    if isinstance(state, (tuple, list)):
        return [_flatten_state(s, f"{key}.{i}", out) for i, s in enumerate(state)]
    raise CheckpointError(f"cannot save optimizer state of type {type(state).__name__}")


def _unflatten_state(layout: Any, arrays: dict, ctx: mx.Context) -> Any:
    if layout is None:
        return None
    if isinstance(layout, str):
        return arrays[layout].as_in_context(ctx).copy()
    return tuple(_unflatten_state(item, arrays, ctx) for item in layout)


def optimizer_state_arrays(trainer: gluon.Trainer, names: dict) -> tuple[dict, dict]:
    """(arrays, info) for the optimizer of a Trainer with ``update_on_kvstore=False``.

    ``names`` maps each Parameter to its structured name (``features.conv1.weight``), which, unlike
    ``Parameter.name``, does not depend on how many models the process built before.
    The states of device 0 are saved: every device holds the same ones after each synchronised step.
    """
    if trainer._update_on_kvstore:  # only reachable with a kvstore that updates on the server
        raise CheckpointError("optimizer states live on the kvstore server; train with update_on_kvstore=False")
    optimizer = trainer._optimizer
    updater = trainer._updaters[0]
    device0 = trainer._contexts[0].device_id
    counts = optimizer._all_index_update_counts.get(device0, {})
    arrays, layout, update_counts = {}, {}, {}
    for index, param in enumerate(trainer._params):
        name = names[param]
        if index in updater.states:
            layout[name] = _flatten_state(updater.states[index], f"optim/{name}", arrays)
        if index in counts:
            update_counts[name] = counts[index]
    info = {"num_update": optimizer.num_update, "update_counts": update_counts, "layout": layout,
            "optimizer": type(optimizer).__name__.lower()}
    return arrays, info


def restore_optimizer_state(trainer: gluon.Trainer, names: dict, info: dict, arrays: dict) -> None:
    """Put saved optimizer states and update counters into every device's updater of a fresh Trainer."""
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    if trainer._update_on_kvstore:
        raise CheckpointError("optimizer states live on the kvstore server; train with update_on_kvstore=False")
    saved_kind, kind = info.get("optimizer"), type(trainer._optimizer).__name__.lower()
    if saved_kind and saved_kind != kind:
        raise CheckpointError(f"the checkpoint's optimizer is {saved_kind}, this run's is {kind}: "
                              f"use --optimizer {saved_kind} or start a new run")
    optimizer = trainer._optimizer
    index_of = {names[p]: i for i, p in enumerate(trainer._params)}
    missing = set(info["layout"]) - set(index_of)
    if missing:
        raise CheckpointError(f"optimizer state for unknown parameters, e.g. {sorted(missing)[0]}")
    for updater, ctx in zip(trainer._updaters, trainer._contexts):
        updater.states = {index_of[n]: _unflatten_state(layout, arrays, ctx) for n, layout in info["layout"].items()}
        updater.states_synced = dict.fromkeys(updater.states, True)
    counts = {index_of[n]: c for n, c in info["update_counts"].items()}
    optimizer._all_index_update_counts = {ctx.device_id: dict(counts) for ctx in trainer._contexts}
    optimizer._index_update_count = optimizer._all_index_update_counts[trainer._contexts[0].device_id]
    optimizer.num_update = int(info["num_update"])


def save_checkpoint(output_dir: str, prefix: str, epoch: int | None, export_net: gluon.HybridBlock | None,
                    state_arrays: dict, manifest: dict) -> dict[str, str]:
    """Write the export (unless ``export_net`` is None), the state arrays and, last, the manifest; each atomically.

    ``epoch=None`` writes the mid-epoch checkpoint (no export). Returns the paths.
    """
    paths = checkpoint_paths(output_dir, prefix, epoch)
    if export_net is not None:
        export_atomic(export_net, output_dir, prefix, epoch)
    _atomic_nd_save(paths["state"], state_arrays)
    atomic_write_text(paths["manifest"], json.dumps(manifest, indent=1, sort_keys=True))
    return paths


def load_partial_manifest(output_dir: str, prefix: str) -> dict | None:
    """The mid-epoch checkpoint's manifest, or None when there is none (or it is incomplete)."""
    paths = checkpoint_paths(output_dir, prefix, None)
    if not (os.path.isfile(paths["manifest"]) and os.path.isfile(paths["state"])):
        return None
    try:
        with open(paths["manifest"], encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_manifest(output_dir: str, prefix: str, epoch: int) -> dict:
    paths = checkpoint_paths(output_dir, prefix, epoch)
    if epoch not in list_epochs(output_dir, prefix):
        existing = list_epochs(output_dir, prefix)
        have = ", ".join(map(str, existing)) if existing else "none"
        raise CheckpointError(f"no complete checkpoint for epoch {epoch} in {output_dir} (prefix {prefix!r}); "
                              f"epochs that exist: {have}")
    try:
        with open(paths["manifest"], encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{paths['manifest']} is unreadable ({exc}); resume from another epoch") from None


def load_state_arrays(output_dir: str, prefix: str, epoch: int | None) -> dict:
    path = checkpoint_paths(output_dir, prefix, epoch)["state"]
    try:
        return mx.nd.load(path)
    except mx.base.MXNetError:
        raise CheckpointError(f"{path} is corrupt; resume from another epoch") from None


def remove_epoch(output_dir: str, prefix: str, epoch: int | None) -> None:
    """Delete an epoch's files (the manifest first, so a crash midway leaves no half checkpoint that looks whole)."""
    paths = checkpoint_paths(output_dir, prefix, epoch)
    for key in ("manifest", "state", "export"):
        if os.path.exists(paths[key]):
            os.remove(paths[key])


def iter_named_params(net: gluon.Block) -> Iterable[tuple[str, gluon.Parameter]]:
    """(structured name, Parameter) pairs, e.g. ('features.conv1.weight', ...)."""
    return net._collect_params_with_prefix().items()
