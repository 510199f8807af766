"""Every registered model's name and settings, as data: :mod:`registry` builds them; the trainer's parser offers the
names before MXNet loads (this module imports nothing). A new variant is an entry here."""
from __future__ import annotations

__all__ = ["PAPER_FILTER_LIST", "MODEL_CONFIGS", "ALIGNED_CONFIGS", "model_names"]

#: The paper's widths (``Xception``'s default): 22,855,952 trainable parameters with 1,000 classes.
PAPER_FILTER_LIST = (64, 128, 256, 728, 1024, 1536, 2048)

#: The paper's family: name -> ``Xception`` keyword arguments.
MODEL_CONFIGS: dict[str, dict] = {
    # The paper's network: 22,855,952 trainable parameters with 1,000 classes.
    "xception": {"filter_list": PAPER_FILTER_LIST},
    # Half width from block 2 on (the MXNet example's default): 6,311,180 trainable parameters with 1,000 classes.
    "xception_slim": {"filter_list": (64, 64, 128, 364, 512, 768, 1024)},
}

#: The aligned family: name -> ``aligned.block_table`` arguments, the entry flow after the stem (width, stride) and
#: the middle flow's repeat count.
ALIGNED_CONFIGS: dict[str, dict] = {
    "xception41": {"entry": ((128, 2), (256, 2), (728, 2)), "middle": 8},
    "xception65": {"entry": ((128, 2), (256, 2), (728, 2)), "middle": 16},
    "xception71": {"entry": ((128, 2), (256, 1), (256, 2), (728, 1), (728, 2)), "middle": 16},
}


def model_names() -> list[str]:
    """The registered names: the paper's family, then the aligned one (``registry.list_models``)."""
    return sorted(MODEL_CONFIGS) + sorted(ALIGNED_CONFIGS)
