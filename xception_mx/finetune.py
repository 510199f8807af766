"""Fine-tuning: start a new run from pretrained features with a fresh classifier.

Weights come from any of our NDArray files (no pickle), by structured parameter name (``features.conv1.weight``):

- a training checkpoint's state, ``PREFIX-EEEE.state.params`` (or just ``PREFIX-EEEE``): its EMA weights when the
  run kept them (what it evaluated and exported), else its raw weights;
- a Gluon ``save_parameters`` file, as ``python -m xception_mx.convert`` writes for timm or Keras weights.

An MXNet export (``PREFIX-EEEE.params`` with ``arg:``/``aux:`` names) names parameters by Gluon's global counters,
not by structure, so it is refused with a pointer to the state file.

Freezing uses the optimizer's ``lr_mult`` (0 while frozen, ``features_lr_mult`` after), not ``grad_req``: a
hybridized ``static_alloc`` graph keeps its gradient buffers, and a per-epoch multiplier is exact on resume. While
frozen, BatchNorm running statistics of the features still adapt to the new data.
"""
from __future__ import annotations

import os

import mxnet as mx

from .errors import UserError
from .weights import load_named, read_arrays

__all__ = ["read_weights", "load_backbone", "set_features_lr_mult", "model_overrides", "HEAD_PREFIX"]

#: The output part (the classifier) that fine-tuning replaces.
HEAD_PREFIX = "fc."


def _resolve_path(source: str) -> str:
    for candidate in (source, source + ".state.params", source + ".params"):
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"--pretrained {source}: no such file (give PREFIX-EEEE.state.params of a run, "
                    f"PREFIX-EEEE, or a converted weights file)")


def read_weights(source: str) -> dict[str, mx.nd.NDArray]:
    """Structured-name weights from a training state file or a Gluon parameter file."""
    path = _resolve_path(source)
    arrays = read_arrays(path, "--pretrained")
    if any(k.startswith(("arg:", "aux:")) for k in arrays):
        raise UserError(f"--pretrained {path} is an MXNet export (arg:/aux: names): give the run's "
                        f"PREFIX-EEEE.state.params, or convert the weights with python -m xception_mx.convert")
    if any(k.startswith("param/") for k in arrays):
        kind = "ema/" if any(k.startswith("ema/") for k in arrays) else "param/"
        return {k[len(kind):]: v for k, v in arrays.items() if k.startswith(kind)}
    return dict(arrays)


def load_backbone(named: dict, weights: dict[str, mx.nd.NDArray], head_prefix: str = HEAD_PREFIX) -> int:
    """Copy every non-head parameter from ``weights``; the head keeps its fresh initialisation.

    Every feature parameter must be present with the same shape (else one line naming it). Returns how many
    parameters were loaded.
    """
    return load_named(named, weights, "the --pretrained weights", skip_prefix=head_prefix, allow_extra=True)


def set_features_lr_mult(named: dict, mult: float, head_prefix: str = HEAD_PREFIX) -> None:
    """Learning-rate multiplier of every non-head parameter; 0 freezes them.

    Weight decay needs no change: every optimizer here scales the whole update (decay included) by the lr.
    """
    for name, param in named.items():
        if not name.startswith(head_prefix):
            param.lr_mult = mult


def model_overrides(source: str) -> dict:
    """Model settings the weights need, from a converter sidecar (``OUT_PREFIX.json``): BN epsilon, pooling."""
    from .convert import read_sidecar

    prefix = source[:-len(".params")] if source.endswith(".params") else source
    meta = read_sidecar(prefix, required=False)
    model = meta["model"] if meta else {}
    return {k: model[k] for k in ("bn_epsilon", "pool_padding") if k in model}
