"""Optimizer state of a Gluon ``Trainer`` as NDArrays + JSON, and back (MXNet internals live here only).

``Trainer.save_states`` would pickle the optimizer (and with it the LR scheduler, which is how GluonCV's resume
freezes the LR on another device list, apache/mxnet#17357); we store the updaters' states and the update counters
instead, which restores the schedule position exactly whatever the device list.
"""
from __future__ import annotations

from typing import Any

import mxnet as mx
from mxnet import gluon

from .errors import UserError

__all__ = ["optimizer_state_arrays", "restore_optimizer_state"]


def _flatten_state(state: Any, key: str, out: dict) -> Any:
    """Optimizer state (NDArray / nested tuple / None) -> layout JSON, with arrays put into ``out``."""
    if state is None:
        return None
    if isinstance(state, mx.nd.NDArray):
        out[key] = state.as_in_context(mx.cpu())
        return key
    if isinstance(state, (tuple, list)):
        return [_flatten_state(s, f"{key}.{i}", out) for i, s in enumerate(state)]
    raise UserError(f"cannot save optimizer state of type {type(state).__name__}")


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
        raise UserError("optimizer states live on the kvstore server; train with update_on_kvstore=False")
    optimizer = trainer._optimizer
    updater = trainer._updaters[0]
    device0 = trainer._contexts[0].device_id
    counts = optimizer._all_index_update_counts.get(device0, {})
    arrays: dict[str, mx.nd.NDArray] = {}
    layout: dict[str, Any] = {}
    update_counts: dict[str, int] = {}
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
        raise UserError("optimizer states live on the kvstore server; train with update_on_kvstore=False")
    saved_kind, kind = info.get("optimizer"), type(trainer._optimizer).__name__.lower()
    if saved_kind and saved_kind != kind:
        raise UserError(f"the checkpoint's optimizer is {saved_kind}, this run's is {kind}: "
                              f"use --optimizer {saved_kind} or start a new run")
    optimizer = trainer._optimizer
    index_of = {names[p]: i for i, p in enumerate(trainer._params)}
    missing = set(info["layout"]) - set(index_of)
    if missing:
        raise UserError(f"optimizer state for unknown parameters, e.g. {sorted(missing)[0]}")
    for updater, ctx in zip(trainer._updaters, trainer._contexts):
        updater.states = {index_of[n]: _unflatten_state(layout, arrays, ctx) for n, layout in info["layout"].items()}
        updater.states_synced = dict.fromkeys(updater.states, True)
    counts = {index_of[n]: c for n, c in info["update_counts"].items()}
    optimizer._all_index_update_counts = {ctx.device_id: dict(counts) for ctx in trainer._contexts}
    optimizer._index_update_count = optimizer._all_index_update_counts[trainer._contexts[0].device_id]
    optimizer.num_update = int(info["num_update"])
