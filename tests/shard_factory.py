"""Tiny image trees for the data tests: every image's identity is recoverable from its pixels.

``flat_colour(i)`` paints image ``i`` one flat colour from a palette whose entries are 32 levels apart, so the colour
survives JPEG, any crop, resize and mirror, and ``identify`` maps a decoded image back to ``i``.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

LEVELS = np.arange(16, 256, 32)  # 8 levels per channel -> 512 identities


def flat_colour(i: int) -> tuple[int, int, int]:
    """RGB colour of image ``i``."""
    return int(LEVELS[i % 8]), int(LEVELS[(i // 8) % 8]), int(LEVELS[(i // 64) % 8])


def identify(rgb_image: np.ndarray, count: int) -> int:
    """Which of images 0..count-1 a decoded (3, H, W) or (H, W, 3) RGB image in 0..255 is; asserts it is flat."""
    img = np.asarray(rgb_image, dtype=np.float32)
    channels = img.reshape(3, -1) if img.shape[0] == 3 else img.reshape(-1, 3).T
    mean = channels.mean(axis=1)
    assert np.abs(channels - mean[:, None]).max() < 12, "image is not flat: identity lost"
    palette = np.array([flat_colour(i) for i in range(count)], np.float32)
    best = int(np.argmin(np.abs(palette - mean).max(axis=1)))
    assert np.abs(palette[best] - mean).max() < 12, f"colour {mean} matches no palette entry"
    return best


def textured(i: int, size: int = 32) -> np.ndarray:
    """A smooth, image-specific BGR gradient (JPEG keeps it within a few levels)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    r, g, b = flat_colour(i)
    img = np.stack([b * 0.6 + 90 * x, g * 0.6 + 90 * y, r * 0.6 + 45 * (x + y)], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tree(root: str, class_names: list[str], per_class: int, size: int = 32, flat: bool = True,
               ext: str = ".jpg") -> dict[str, tuple[int, str]]:
    """Class folders of images; returns {relative path: (identity, class name)}. Identities follow class order."""
    made = {}
    for c, name in enumerate(class_names):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for k in range(per_class):
            identity = c * per_class + k
            rel = os.path.join(name, f"img{identity:03d}{ext}")
            if flat:
                r, g, b = flat_colour(identity)
                img = np.zeros((size, size, 3), np.uint8) + np.array([b, g, r], np.uint8)
            else:
                img = textured(identity, size)
            cv2.imwrite(os.path.join(root, rel), img, [cv2.IMWRITE_JPEG_QUALITY, 98])
            made[rel] = (identity, name)
    return made
