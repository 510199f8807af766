"""``demo-digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download) as train/val shards.

Writes ``OUT/images/<digit>/<digit>_<sample>.jpg`` (dark ink on white, upscaled with bicubic interpolation), then
``OUT/train.lst``, ``OUT/val.lst`` (a seeded, stratified 20% val split), ``OUT/classes.txt`` and the shards
``OUT/train-0000i-of-0000N.rec`` / ``OUT/val-...`` with their ``.idx``. ``--digits 5,6,7,8,9`` keeps those digits,
labelled 0..K-1 in the given order. A rerun replaces everything it wrote before (and only that).
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence

from xception_mx.console import command_line
from xception_mx.errors import UserError

from .listing import label_entries, split_stratified, write_classes, write_lst
from .packing import PackResult, pack

IMAGES_MARKER = ".written-by-im2rec-tools-demo-digits"
VAL_RATIO = 0.2
SPLIT_SEED = 0
_OWN_SHARD = re.compile(r"^(train|val)-\d{5}-of-\d{5}\.(rec|idx)$|^(train|val)-skipped\.txt$")


def parse_digits(text: str) -> list[int]:
    """``"5,6,7"`` -> [5, 6, 7]; UserError unless distinct digits 0..9."""
    try:
        digits = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        digits = []
    if not digits or any(not 0 <= d <= 9 for d in digits) or len(set(digits)) != len(digits):
        raise UserError(f"--digits must be distinct digits 0-9 separated by commas, got {text!r}")
    return digits


def _write_images(images_dir: str, digits: Sequence[int], size: int) -> list[tuple[str, str]]:
    import numpy as np

    from xception_mx.installed import import_cv2

    cv2 = import_cv2()
    from sklearn.datasets import load_digits

    if os.path.exists(images_dir) and not os.path.isfile(os.path.join(images_dir, IMAGES_MARKER)):
        raise UserError(f"{images_dir} exists and was not written by demo-digits: choose another OUT_DIR")
    scans = load_digits()
    tmp_dir = images_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    items = []
    for sample, (scan, digit) in enumerate(zip(scans.images, scans.target)):
        if digit not in digits:
            continue
        ink = np.clip(scan / 16.0, 0, 1)
        img = cv2.resize((255 * (1 - ink)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        rel = os.path.join(str(digit), f"{digit}_{sample:04d}.jpg")
        os.makedirs(os.path.join(tmp_dir, str(digit)), exist_ok=True)
        cv2.imwrite(os.path.join(tmp_dir, rel), np.clip(img + 0.5, 0, 255).astype(np.uint8),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        items.append((rel, str(digit)))
    open(os.path.join(tmp_dir, IMAGES_MARKER), "w").close()
    shutil.rmtree(images_dir, ignore_errors=True)
    os.replace(tmp_dir, images_dir)
    return items


def make_demo_digits(out_dir: str, size: int = 80, digits: Sequence[int] = tuple(range(10)), shards: int = 2,
                     progress: bool = True) -> dict[str, object]:
    """Write the demo data set; returns {"images": n, "train": PackResult, "val": PackResult, "classes": path}."""
    if not 8 <= size <= 1024:
        raise UserError(f"--size must be between 8 and 1024 pixels, got {size}")
    if shards < 1:
        raise UserError(f"--shards must be at least 1, got {shards}")
    os.makedirs(out_dir, exist_ok=True)
    images_dir = os.path.join(out_dir, "images")
    items = _write_images(images_dir, digits, size)
    class_names = [str(d) for d in digits]
    train, val = split_stratified(label_entries(items, class_names, "the digits"), VAL_RATIO, SPLIT_SEED)
    for name in os.listdir(out_dir):
        if _OWN_SHARD.match(name):
            os.remove(os.path.join(out_dir, name))
    result: dict[str, object] = {"images": len(items), "images_dir": images_dir}
    for split, entries in (("train", train), ("val", val)):
        lst = os.path.join(out_dir, f"{split}.lst")
        write_lst(lst, entries)
        result[split] = pack(lst, os.path.join(out_dir, split), images_dir, shards=min(shards, len(entries)),
                             quality=95, workers=1, overwrite=True, progress=progress)
    classes = os.path.join(out_dir, "classes.txt")
    write_classes(classes, class_names)
    result["classes"] = classes
    return result


def describe(result: dict[str, object], digits: Sequence[int], size: int) -> str:
    """What demo-digits wrote, for the terminal."""
    lines = [f"demo-digits: {result['images']} scans of digits {','.join(map(str, digits))} "
             f"(scikit-learn load_digits) as {size}x{size} JPEGs in {result['images_dir']}"]
    for split in ("train", "val"):
        packed: PackResult = result[split]  # type: ignore[assignment]
        n = sum(s.records for s in packed.shards)
        lines.append(f"  {split:<5} {n:>5} images in {len(packed.shards)} shards: "
                     + ", ".join(os.path.basename(s.rec_path) for s in packed.shards))
    mapping = ", ".join(f"{label}={d}" for label, d in enumerate(digits))
    lines.append(f"  classes: {result['classes']} (label=digit: {mapping})")
    train = os.path.join(os.path.dirname(str(result["classes"])) or ".", "train")
    lines.append(f"  check them with: {command_line('python -m im2rec_tools', 'verify', train, '--decode')}")
    return "\n".join(lines)
