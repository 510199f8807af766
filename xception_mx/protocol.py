"""The preprocessing protocol of an export: input size, crop_pct, mean, std, interpolation.

Written as ``PREFIX-preprocess.json`` beside every export the project makes (trainer checkpoints and converter
outputs); ``score.py`` and ``predict`` read it, so an export scores with its own protocol unless flags override it.
Evaluation resizes the shorter side to ``floor(size / crop_pct)`` with ``interpolation``, then centre-crops.
Imports no MXNet.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from .config import RunConfig
from .errors import UserError
from .fileio import atomic_write_text

__all__ = ["Preprocess", "INTERPOLATIONS", "val_resize", "protocol_path"]

#: Name -> OpenCV flag, which is also ImageRecordIter's ``inter_method`` (cv2.INTER_LINEAR = 1, INTER_CUBIC = 2).
INTERPOLATIONS = {"bilinear": 1, "bicubic": 2}


def val_resize(size: int, crop_pct: float) -> int:
    """Shorter side before the centre crop: ``floor(size / crop_pct)`` (333 for 299 at 0.8975, as timm)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return int(math.floor(size / crop_pct + 1e-6))


def protocol_path(model_prefix: str) -> str:
    return f"{model_prefix}-preprocess.json"


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network's input at evaluation (0-255 RGB scale for mean and std)."""

    input_size: int = 299
    crop_pct: float = 0.8975
    mean: tuple[float, ...] = (127.5, 127.5, 127.5)
    std: tuple[float, ...] = (127.5, 127.5, 127.5)
    interpolation: str = "bilinear"
    channel_order: str = field(default="RGB", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problem = None
        if int(self.input_size) < 1:
            problem = f"input_size must be >= 1, got {self.input_size}"
        elif not 0 < self.crop_pct <= 1:
            problem = f"crop_pct must be in (0, 1], got {self.crop_pct}"
        elif len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problem = f"mean and std need 3 values (RGB) and std > 0, got {self.mean} / {self.std}"
        elif self.interpolation not in INTERPOLATIONS:
            problem = f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
        if problem:
            raise UserError(f"preprocessing: {problem}")

    @property
    def resize_shorter(self) -> int:
        return val_resize(self.input_size, self.crop_pct)

    @property
    def inter_method(self) -> int:
        return INTERPOLATIONS[self.interpolation]

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(mean=list(self.mean), std=list(self.std), resize_shorter=self.resize_shorter)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> Preprocess:
        keys = ("input_size", "crop_pct", "mean", "std", "interpolation")
        return cls(**{k: values[k] for k in keys if k in values})

    @classmethod
    def from_config(cls, config: RunConfig) -> Preprocess:
        """The validation protocol of a training config."""
        return cls(config.input_size, config.crop_pct, config.mean, config.std, config.interpolation)

    def write(self, model_prefix: str) -> str:
        path = protocol_path(model_prefix)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def read(cls, model_prefix: str) -> Preprocess | None:
        """The protocol written beside ``model_prefix``'s export, or None when there is none."""
        path = protocol_path(model_prefix)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is unreadable ({exc}): fix or delete it, or pass the preprocessing flags") \
                from None
        if not isinstance(values, dict):
            raise UserError(f"{path} is not a preprocessing protocol (a JSON object)")
        return cls.from_dict(values)
