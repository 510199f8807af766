"""Shards on disk, without MXNet: find them, check every record header, count records, cut an epoch into batches.

``plan.py`` runs these checks before anything is built; ``data.py`` builds MXNet's iterators on the same shards.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from im2rec_tools.headers import IR_HEADER, PNG_END, PNG_SIGNATURE, image_problem
from im2rec_tools.listing import is_image_name
from im2rec_tools.recordfile import HEADER_BYTES, MAGIC
from im2rec_tools.shards import duplicate_shards, lookup_shards, read_offsets

from .console import command_line
from .errors import UserError

__all__ = ["find_shards", "refuse_image_folder", "as_paths", "check_records", "check_checksums", "count_records",
           "part_sizes", "EpochPlan", "epoch_plan", "num_train_batches", "check_labels", "read_classes",
           "derived_seeds"]


def find_shards(spec: str) -> list[str]:
    """Sorted absolute ``.rec`` paths for a spec: a shard prefix (``d/train`` -> ``d/train-NNNNN-of-NNNNN.rec``,
    or ``d/train.rec``), a glob (``d/train-*.rec``), one ``.rec`` path, or a ``;``-separated list of those.

    UserError if a part matches nothing, a ``.rec`` lacks its ``.idx``, or a numbered set has a hole or mixes two
    packs (a shard missing from ``train-*-of-00008`` would otherwise silently train on 7/8 of the data).
    """
    try:
        lookup = lookup_shards(spec)
    except UserError:
        if os.path.isdir(spec) and _holds_images(spec):  # xception-score --rec my_images
            raise _image_folder(spec, "") from None
        raise
    if lookup.problems:
        more = f" (and {len(lookup.problems) - 1} more problems)" if len(lookup.problems) > 1 else ""
        raise UserError(lookup.problems[0] + more)
    return lookup.rec_paths


def refuse_image_folder(folder: str, flag: str) -> None:
    """A folder given as ``flag`` (``--data-dir``) that holds images and no shards: one line that says how to pack
    them (``im2rec-tools build``)."""
    if not any(name.endswith(".rec") for name in os.listdir(folder)) and _holds_images(folder):
        raise _image_folder(folder, flag)


def _holds_images(folder: str, depth: int = 1) -> bool:
    """Images (``make-list``'s extensions) in ``folder`` or up to ``depth`` levels below (its class folders); a
    folder that cannot be read holds none."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if is_image_name(entry.name) and entry.is_file():
                    return True
                if depth and entry.is_dir() and _holds_images(entry.path, depth - 1):
                    return True
    except OSError:
        pass
    return False


def _image_folder(folder: str, flag: str) -> UserError:
    out = os.path.normpath(folder) + "_shards"
    build = command_line("python -m im2rec_tools", "build", folder, out, "--val-ratio", "0.1")
    if flag:
        return UserError(f"{flag} {folder} holds images, not RecordIO shards: run {build} and train on {out} "
                         f"({flag} {out})")
    return UserError(f"{folder} holds images, not RecordIO shards: pack them with {build} (then the shards are "
                     f"{os.path.join(out, 'train')} and {os.path.join(out, 'val')})")


def as_paths(rec_paths: str | Sequence[str]) -> list[str]:
    paths = find_shards(rec_paths) if isinstance(rec_paths, str) else [os.path.abspath(p) for p in rec_paths]
    if not paths:
        raise UserError("empty shard set: no .rec files given")
    return paths


def _offsets(rec: str) -> list[int]:
    return read_offsets(rec)


@dataclass(frozen=True)
class RecordScan:
    """What the start-up check saw: how many records, the highest label among them (-1: none) and where it is."""
    records: int
    max_label: int
    max_label_at: str = ""


def check_records(rec_paths: str | Sequence[str], num_classes: int | None = None) -> RecordScan:
    """Read the header, the label and the image header of every record the ``.idx`` files point at.

    MXNet's C++ reader aborts the whole process on a broken record header (``Check failed: p[0] ==
    RecordIOWriter::kMagic``) and dies with SIGFPE on a payload that is no image, possibly days into a run; this
    finds both at start, with labels outside ``0..num_classes-1``, as one line naming the shard and record. Nothing
    is decoded (``im2rec-tools verify --decode`` does that).
    """
    total, max_label, where = 0, -1, ""
    for rec in as_paths(rec_paths):
        offsets = _offsets(rec)
        size = os.path.getsize(rec)
        with open(rec, "rb") as f:
            for index, offset in enumerate(offsets):
                problem, label = _record_problem(f, offset, size, num_classes)
                if problem:
                    raise UserError(f"{rec}: record {index} (byte {offset}) {problem}: check the shards with "
                                    f"`im2rec-tools verify` and repack the bad one")
                if label > max_label:
                    max_label, where = label, f"{rec}: record {index} (byte {offset})"
        total += len(offsets)
    return RecordScan(total, max_label, where)


def check_checksums(rec_paths: str | Sequence[str], verify: bool = False) -> list[str]:
    """Compare every shard with its ``.crc`` sidecar (``pack`` writes one): record count and offsets always, every
    record's CRC-32 with ``verify`` (reads all the data). One line naming shard and record on a mismatch. Returns the
    shards that have no sidecar (packed by MXNet's im2rec.py), which cannot be checksum-verified."""
    from im2rec_tools.shards import checksum_problems

    unverifiable = []
    for rec in as_paths(rec_paths):
        problems = checksum_problems(rec, full=verify)
        if problems is None:
            unverifiable.append(rec)
        elif problems:
            where, reason = problems[0]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(f"{rec}: {where} {reason}{more}: check it with `im2rec-tools verify` and repack it")
    return unverifiable


def check_duplicates(rec_paths: str | Sequence[str]) -> None:
    """One line when two of the shards hold the same records (a copied shard, or a validation shard that is a
    training one): every record of it would count twice."""
    copies = duplicate_shards(as_paths(rec_paths))
    if copies:
        first, copy = copies[0]
        more = f" (and {len(copies) - 1} more pairs)" if len(copies) > 1 else ""
        if os.path.samefile(first, copy):
            raise UserError(f"{copy} is read twice{more}: give each shard once (training and validation shards "
                            f"must differ)")
        raise UserError(f"{copy} holds the same records as {first}{more}: a copied shard? remove one of them")


#: Bytes at a JPEG's end searched for its end-of-image marker (some cameras append a trailer after it).
JPEG_TAIL = 4096


def _record_problem(f, offset: int, size: int, num_classes: int | None) -> tuple[str | None, int]:
    """(why the record at ``offset`` would stop a run or None, its label or -1). Reads its first few KiB (and its
    last bytes)."""
    f.seek(offset)
    head = f.read(HEADER_BYTES + 4096)
    if len(head) < HEADER_BYTES:
        return "is cut off (the .rec is truncated)", -1
    magic, lrec = struct.unpack_from("<II", head)
    length = lrec & ((1 << 29) - 1)
    if magic != MAGIC or lrec >> 29 not in (0, 1) or offset + HEADER_BYTES + ((length + 3) & ~3) > size:
        return "is corrupt (bad record header)", -1
    payload = head[HEADER_BYTES:HEADER_BYTES + length]
    if len(payload) < IR_HEADER.size:
        return "is too short to hold a label and an image", -1
    flag, label = IR_HEADER.unpack_from(payload)[:2]
    if flag == 0 and not (label >= 0 and label == int(label)):
        return f"has label {label:g}, which is no class number (0, 1, 2, ...)", -1
    if flag == 0 and num_classes is not None and label >= num_classes:
        return f"has label {label:g}, outside 0..{num_classes - 1} (check classes.txt and --num-classes)", -1
    seen = int(label) if flag == 0 and label >= 0 and label == int(label) else -1
    if lrec >> 29:  # a record split into parts (its payload holds the magic number): not parsed here
        return None, seen
    start, image_len = offset + HEADER_BYTES + IR_HEADER.size + 4 * flag, length - IR_HEADER.size - 4 * flag
    image = payload[IR_HEADER.size + 4 * flag:]
    problem = image_problem(image, complete=len(image) >= image_len)
    if problem == "incomplete":  # the headers run past what was read: read the whole image
        f.seek(start)
        image = f.read(image_len)
        problem = image_problem(image, complete=True)
    if problem is None and image[:4] == PNG_SIGNATURE[:4]:
        f.seek(start + image_len - len(PNG_END))
        problem = None if f.read(len(PNG_END)) == PNG_END else "is a PNG cut off before its end (no IEND chunk)"
    elif problem is None and image[:2] == b"\xff\xd8":  # OpenCV decodes a cut JPEG with only a libjpeg warning
        tail = min(image_len, JPEG_TAIL)
        f.seek(start + image_len - tail)
        problem = None if b"\xff\xd9" in f.read(tail) else "is a JPEG cut off before its end (no end-of-image marker)"
    return problem, seen


def count_records(rec_paths: str | Sequence[str]) -> int:
    """Number of records in the shards, from their ``.idx`` files (cached; cheap integrity checks included)."""
    return sum(len(_offsets(p)) for p in as_paths(rec_paths))


def part_sizes(num_records: int, num_parts: int) -> list[int]:
    """Records per part as MXNet (dmlc-core IndexedRecordIOSplitter) splits them: ``ceil(N/P)`` each, the rest last."""
    step = -(-num_records // num_parts)
    return [max(0, min(num_records, (i + 1) * step) - i * step) for i in range(num_parts)]


def check_parts(batch_size: int, num_parts: int, part_index: int) -> None:
    if batch_size < 1 or num_parts < 1 or not 0 <= part_index < num_parts:
        raise ValueError(f"need batch_size >= 1 and 0 <= part_index < num_parts, got batch_size={batch_size}, "
                         f"part_index={part_index}, num_parts={num_parts}")


@dataclass(frozen=True)
class EpochPlan:
    """How one training epoch is cut into batches."""
    records: int
    part_sizes: tuple[int, ...]
    batches_per_part: int
    dropped_per_epoch: int  # records not seen in an epoch: each part's remainder after its full batches


def epoch_plan(rec_paths: str | Sequence[str], batch_size: int, num_parts: int = 1) -> EpochPlan:
    """Batches per part and records dropped per epoch for ``train_iter`` (0 batches: too few records)."""
    check_parts(batch_size, num_parts, 0)
    n = count_records(rec_paths)
    sizes = part_sizes(n, num_parts)
    batches = min(sizes) // batch_size
    return EpochPlan(n, tuple(sizes), batches, n - batches * batch_size * num_parts)


def num_train_batches(rec_paths: str | Sequence[str], batch_size: int, num_parts: int = 1) -> int:
    """Full batches every part of ``train_iter`` yields per epoch; 0 when the smallest part holds less than a batch."""
    return epoch_plan(rec_paths, batch_size, num_parts).batches_per_part


def check_labels(label, num_classes: int) -> None:
    """UserError unless every label (an array, or an NDArray) is a whole number in ``0 .. num_classes-1``."""
    values = label.asnumpy() if hasattr(label, "asnumpy") else np.asarray(label)
    bad = ~np.isfinite(values) | (values < 0) | (values >= num_classes) | (values != np.round(values))
    if bad.any():
        raise UserError(f"label {values[bad].flat[0]:g} is outside 0..{num_classes - 1}: the shards hold more "
                        f"classes than the model's {num_classes} (check classes.txt and num_classes)")


def read_classes(path: str | None, num_classes: int | None = None) -> list[str]:
    """Class names in label order from ``classes.txt`` (``im2rec-tools make-list``); no path: the label numbers.

    With ``num_classes`` the file must name exactly that many classes.
    """
    if not path:
        return [str(i) for i in range(num_classes or 0)]
    from im2rec_tools.listing import read_classes as read_class_file

    names = read_class_file(path)
    if num_classes is not None and len(names) != num_classes:
        raise UserError(f"{path} names {len(names)} classes, the model has {num_classes}: give the classes.txt "
                        f"of the data the model was trained on")
    return names


def derived_seeds(*parts: int, n: int = 1) -> list[int]:
    """``n`` independent 31-bit seeds from ``parts`` (e.g. the run's seed and an epoch); MXNet takes 31-bit seeds.

    The one seeding scheme of the project: data order and augmentation per epoch and part, and the trainer's
    per-epoch dropout and mixup streams.
    """
    return [int(v % 2**31) for v in np.random.SeedSequence(list(parts)).generate_state(n)]
