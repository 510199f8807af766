"""Named weights: read an NDArray weights file and load it into a network by structured parameter name.

One loader (and one set of messages) for resume, fine-tuning and conversion. Structured names
(``features.conv1.weight``, ``fc.bias``) do not depend on how many networks the process built before, unlike
``Parameter.name``; MXNet exports (``arg:``/``aux:`` names) use the latter, so they are not weight sources here.
"""
from __future__ import annotations

import os

import mxnet as mx
from mxnet import gluon

from .errors import UserError

__all__ = ["named_params", "read_arrays", "load_named"]


def named_params(net: gluon.Block) -> dict[str, gluon.Parameter]:
    """{structured name: Parameter}, e.g. ``features.conv1.weight``."""
    return dict(net._collect_params_with_prefix().items())


def read_arrays(path: str, what: str) -> dict[str, mx.nd.NDArray]:
    """The named arrays of an ``mx.nd.save`` file (no pickle); one line naming ``what`` when it is unusable."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} {path} is empty (0 bytes): it was cut short; use another file")
    try:
        arrays = mx.nd.load(path)
    except mx.base.MXNetError:
        raise UserError(f"{what} {path} is not an MXNet NDArray file (or is corrupt)") from None
    if not isinstance(arrays, dict) or not arrays:
        raise UserError(f"{what} {path} holds no named arrays")
    return arrays


def load_named(named: dict[str, gluon.Parameter], arrays: dict[str, mx.nd.NDArray], source: str,
               skip_prefix: str | None = None, allow_extra: bool = False) -> int:
    """Copy ``arrays[name]`` into every parameter of ``named`` (except those under ``skip_prefix``).

    Every parameter must be present with its shape; unless ``allow_extra``, no array may be left over. One line
    naming the first problem and ``source``; nothing is loaded then. Uninitialised parameters are initialised
    with the value. Returns how many parameters were loaded.
    """
    wanted = {n: p for n, p in named.items() if not (skip_prefix and n.startswith(skip_prefix))}
    missing = sorted(set(wanted) - set(arrays))
    extra = sorted(n for n in set(arrays) - set(named) if not (skip_prefix and n.startswith(skip_prefix)))
    hint = "use the same --model, --filter-list and --num-classes as the run that wrote them"
    if missing:
        raise UserError(f"{source} does not fit this model (it has no {missing[0]}{_more(missing)}): {hint}")
    if extra and not allow_extra:
        raise UserError(f"{source} does not fit this model (unexpected {extra[0]}{_more(extra)}): {hint}")
    for name, param in wanted.items():
        if tuple(arrays[name].shape) != tuple(param.shape) and param.shape and 0 not in param.shape:
            raise UserError(f"{source} does not fit this model ({name} is {tuple(arrays[name].shape)}, the model "
                            f"has {tuple(param.shape)}): {hint}")
    for name, param in wanted.items():
        if param._data is None:
            param._load_init(arrays[name], ctx=mx.cpu())
        else:
            param.set_data(arrays[name])
    return len(wanted)


def _more(names: list[str]) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""
