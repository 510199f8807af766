"""The model registry: every variant's name and settings, and :func:`get_model` / :func:`list_models`.

It sits above the two builders: ``model.py`` (the paper's network, with the parts both families share: ``relu``,
``stable_name``, ``FEATURES_NAME``, the initialisers) and ``aligned.py`` (the aligned family's block tables and
builder); neither imports this module.
"""
from __future__ import annotations

from mxnet.gluon import nn

from .aligned import XceptionAligned, block_table
from .errors import UserError
from .model import Xception
from .variants import ALIGNED_CONFIGS, MODEL_CONFIGS, model_names

__all__ = ["MODEL_CONFIGS", "ALIGNED_CONFIGS", "ALIGNED_OVERRIDES", "get_model", "list_models"]

#: What :func:`get_model` lets a caller override on an aligned variant (its widths come from its table).
ALIGNED_OVERRIDES = frozenset({"num_classes", "dropout", "in_channels", "bn_epsilon", "bn_momentum",
                               "channel_multiple"})


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`: the paper's family, then the aligned one (``variants.py``)."""
    return model_names()


def get_model(name: str, **overrides) -> nn.HybridBlock:
    """Build a registered variant; keyword arguments override its config (e.g. ``num_classes=10``).
    ``pretrained=True`` is refused in one line (no weights ship with the package); ``pretrained=False`` is ignored."""
    if overrides.pop("pretrained", False):
        raise UserError(f"get_model({name!r}, pretrained=True): xception_mx ships no pretrained weights; convert "
                        f"timm or Keras weights with `xception-convert SRC OUT_PREFIX`, then build from them with "
                        f"xception_mx.convert.build_pretrained(OUT_PREFIX) or fine-tune with `train-xception "
                        f"--pretrained OUT_PREFIX`")
    if name in ALIGNED_CONFIGS:
        unknown = sorted(set(overrides) - ALIGNED_OVERRIDES)
        if unknown:
            raise ValueError(f"{name} is configured by its block table (xception_mx.variants.ALIGNED_CONFIGS): "
                             f"{unknown[0]} applies to {', '.join(sorted(MODEL_CONFIGS))} only")
        return XceptionAligned(block_table(**ALIGNED_CONFIGS[name]), name=name, **overrides)
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return Xception(**{**MODEL_CONFIGS[name], **overrides})
