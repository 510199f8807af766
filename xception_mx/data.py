"""Training and validation batches from RecordIO shards (written by ``im2rec-tools pack``) via MXNet's ImageRecordIter.

* ``train_iter`` is one epoch: shuffled, Inception-style random resized crop, mirror, optional colour jitter and PCA
  lighting noise, mean/std normalisation (RGB order; default maps 0..255 to [-1, 1]). Call it once per epoch with
  the epoch number: each call builds a fresh ImageRecordIter seeded from ``(seed, epoch, num_parts, part_index)``, so
  a run resumed at epoch k sees exactly the batches of an uninterrupted run (for the same ``preprocess_threads``:
  MXNet splits each batch's augmentation across its threads, each with its own random stream).
* Data-parallel parts: MXNet gives part ``i`` of ``P`` the records ``[i*ceil(N/P), (i+1)*ceil(N/P))`` of the shards
  in order (a fixed split; ``make-list`` shuffles the train list so every part mixes all classes), and each epoch
  shuffles within the part. Every part yields exactly ``num_train_batches`` full batches (the smallest part's
  ``size // batch_size``): unequal batch counts would hang ``dist_sync`` (apache/mxnet#9611). The records left over
  in each part (the last ones of that epoch's shuffle, so different ones every epoch) are dropped;
  ``epoch_plan`` says how many.
* ``val_iter``: shorter side resized to ``floor(size / crop_pct)`` (333 for 299, as timm and Keras evaluate
  Xception), centre crop, no shuffle; every record exactly once across parts; the last, partial batch reports
  ``batch.pad`` (its padding rows repeat the batch's first image) so metrics can drop it.
Batches: ``data[0]`` (B, C, H, W) float32, ``label[0]`` (B,) float32.

MXNet 1.9.1 ImageRecordIter quirks handled here (each has a test in tests/test_data.py):
only one ``path_imgidx`` is accepted, so several shards get one merged index (``im2rec_tools.shards.merged_index``);
with ``round_batch=False`` the final partial batch reports ``pad=0`` and holds stale rows, so the pad is set here;
``seed_aug`` re-seeds at every ``reset()`` while without it every new iterator repeats the same augmentation, so each
epoch is a new iterator with its own seeds; dmlc-core leaves the range of a part with no records (``P > N / ceil(N/P)``)
unset, which gave StopIteration, stray records or a crash in trials, so such a part is never built; a lone zero-byte
``.rec`` is refused ("Cannot find any files that matches the URI pattern"), so shards with no records are left out.
The record order does not depend on ``preprocess_threads``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import mxnet as mx
import numpy as np

from im2rec_tools.recordfile import HEADER_BYTES, MAGIC
from im2rec_tools.shards import ShardError, lookup_shards, merged_index, read_offsets

__all__ = ["DataError", "EpochPlan", "find_shards", "count_records", "epoch_plan", "num_train_batches", "part_sizes",
           "train_iter", "val_iter", "synthetic_iter", "check_labels", "read_classes", "val_resize"]


class DataError(ValueError):
    """A data problem worded as one user-facing line (which file, what to do)."""


# -------------------------------------------------------------------------------------------------------- shards

def find_shards(spec: str) -> list[str]:
    """Sorted absolute ``.rec`` paths for a spec: a shard prefix (``d/train`` -> ``d/train-NNNNN-of-NNNNN.rec``,
    or ``d/train.rec``), a glob (``d/train-*.rec``), one ``.rec`` path, or a ``;``-separated list of those.

    DataError if a part matches nothing, a ``.rec`` lacks its ``.idx``, or a numbered set has a hole or mixes two
    packs (a shard missing from ``train-*-of-00008`` would otherwise silently train on 7/8 of the data).
    """
    try:
        lookup = lookup_shards(spec)
    except ShardError as e:
        raise DataError(str(e)) from None
    if lookup.problems:
        more = f" (and {len(lookup.problems) - 1} more problems)" if len(lookup.problems) > 1 else ""
        raise DataError(lookup.problems[0] + more)
    return lookup.rec_paths


def _as_paths(rec_paths: str | Sequence[str]) -> list[str]:
    paths = find_shards(rec_paths) if isinstance(rec_paths, str) else [os.path.abspath(p) for p in rec_paths]
    if not paths:
        raise DataError("empty shard set: no .rec files given")
    return paths


def check_records(rec_paths: str | Sequence[str]) -> int:
    """Check the header of every record the ``.idx`` files point at (8 bytes each, nothing decoded).

    MXNet's C++ reader aborts the whole process on a broken record header (``Check failed: p[0] ==
    RecordIOWriter::kMagic``), possibly days into a run; this finds it at start, as one DataError naming the shard
    and record. Returns the number of records checked. ``im2rec-tools verify --decode`` also decodes every image.
    """
    import struct

    total = 0
    for rec in _as_paths(rec_paths):
        try:
            offsets = read_offsets(rec)
        except ShardError as e:
            raise DataError(str(e)) from None
        size = os.path.getsize(rec)
        with open(rec, "rb") as f:
            for index, offset in enumerate(offsets):
                f.seek(offset)
                header = f.read(HEADER_BYTES)
                magic, lrec = struct.unpack("<II", header) if len(header) == HEADER_BYTES else (None, 0)
                end = offset + HEADER_BYTES + (((lrec & ((1 << 29) - 1)) + 3) & ~3)
                if magic != MAGIC or lrec >> 29 not in (0, 1) or end > size:
                    raise DataError(f"{rec}: record {index} (byte {offset}) is corrupt: check the shards with "
                                    f"`im2rec-tools verify` and repack the bad one")
        total += len(offsets)
    return total


def count_records(rec_paths: str | Sequence[str]) -> int:
    """Number of records in the shards, from their ``.idx`` files (cached; cheap integrity checks included)."""
    try:
        return sum(len(read_offsets(p)) for p in _as_paths(rec_paths))
    except ShardError as e:
        raise DataError(str(e)) from None


def part_sizes(num_records: int, num_parts: int) -> list[int]:
    """Records per part as MXNet (dmlc-core IndexedRecordIOSplitter) splits them: ``ceil(N/P)`` each, the rest last."""
    step = -(-num_records // num_parts)
    return [max(0, min(num_records, (i + 1) * step) - i * step) for i in range(num_parts)]


@dataclass(frozen=True)
class EpochPlan:
    """How one training epoch is cut into batches."""
    records: int
    part_sizes: tuple[int, ...]
    batches_per_part: int
    dropped_per_epoch: int  # records not seen in an epoch: each part's remainder after its full batches


def epoch_plan(rec_paths: str | Sequence[str], batch_size: int, num_parts: int = 1) -> EpochPlan:
    """Batches per part and records dropped per epoch for ``train_iter`` (0 batches: too few records)."""
    _check_parts(batch_size, num_parts, 0)
    n = count_records(rec_paths)
    sizes = part_sizes(n, num_parts)
    batches = min(sizes) // batch_size
    return EpochPlan(n, tuple(sizes), batches, n - batches * batch_size * num_parts)


def num_train_batches(rec_paths: str | Sequence[str], batch_size: int, num_parts: int = 1) -> int:
    """Full batches every part of ``train_iter`` yields per epoch; 0 when the smallest part holds less than a batch."""
    return epoch_plan(rec_paths, batch_size, num_parts).batches_per_part


def read_classes(path: str) -> list[str]:
    """Class names in label order from a ``classes.txt`` written by ``im2rec-tools``."""
    from im2rec_tools import ToolError
    from im2rec_tools.listing import read_classes as _read

    try:
        return _read(path)
    except ToolError as e:
        raise DataError(str(e)) from None


def check_labels(label: mx.nd.NDArray | np.ndarray, num_classes: int) -> None:
    """DataError unless every label is a whole number in ``0 .. num_classes-1``."""
    values = label.asnumpy() if isinstance(label, mx.nd.NDArray) else np.asarray(label)
    bad = ~np.isfinite(values) | (values < 0) | (values >= num_classes) | (values != np.round(values))
    if bad.any():
        raise DataError(f"label {values[bad].flat[0]:g} is outside 0..{num_classes - 1}: the shards hold more "
                        f"classes than the model's {num_classes} (check classes.txt and num_classes)")


# ---------------------------------------------------------------------------------------------------- iterators

def _check_parts(batch_size: int, num_parts: int, part_index: int) -> None:
    if batch_size < 1 or num_parts < 1 or not 0 <= part_index < num_parts:
        raise ValueError(f"need batch_size >= 1 and 0 <= part_index < num_parts, got batch_size={batch_size}, "
                         f"part_index={part_index}, num_parts={num_parts}")


def _check_shape(data_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(x) for x in data_shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 1:
        raise ValueError(f"data_shape must be (channels 1 or 3, height, width), got {tuple(data_shape)}")
    return shape  # type: ignore[return-value]


def _normalisation(mean: Sequence[float], std: Sequence[float]) -> dict[str, float]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values (RGB) and std > 0, got mean={mean}, std={std}")
    return dict(mean_r=mean[0], mean_g=mean[1], mean_b=mean[2], std_r=std[0], std_g=std[1], std_b=std[2])


def _epoch_seeds(seed: int, epoch: int, num_parts: int, part_index: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed) for one epoch of one part; ImageRecordIter takes 31-bit seeds."""
    state = np.random.SeedSequence([seed, epoch, num_parts, part_index]).generate_state(2)
    return int(state[0] % 2**31), int(state[1] % 2**31)


class _BatchCountIter(mx.io.DataIter):
    """Serve exactly ``num_batches`` batches from a freshly made ImageRecordIter; ``reset`` replays the same epoch.

    ``valid_in_last`` < batch_size marks the last batch as padded: ImageRecordIter with ``round_batch=False``
    reports ``pad=0`` for its final partial batch and leaves stale rows (garbage labels) in it, so the pad is set
    here from the known part size and the padding rows are overwritten with the batch's first sample.
    """

    def __init__(self, make: Callable[[], mx.io.DataIter], num_batches: int, batch_size: int,
                 data_shape: tuple[int, int, int], valid_in_last: int | None = None):
        super().__init__(batch_size)
        self._make, self.num_batches = make, num_batches
        self._valid_in_last = batch_size if valid_in_last is None else valid_in_last
        self._source: mx.io.DataIter | None = None
        self._served = 0
        self.provide_data = [mx.io.DataDesc("data", (batch_size,) + data_shape, np.float32)]
        self.provide_label = [mx.io.DataDesc("softmax_label", (batch_size,), np.float32)]

    def __len__(self) -> int:
        return self.num_batches

    def reset(self) -> None:
        self._source, self._served = None, 0  # a new ImageRecordIter replays the epoch from its seeds

    def next(self) -> mx.io.DataBatch:
        if self._served >= self.num_batches:
            raise StopIteration
        if self._source is None:
            self._source = self._make()
        try:
            batch = self._source.next()
        except StopIteration:
            raise DataError(f"the shards ran out after {self._served} of {self.num_batches} batches: they changed "
                            f"while reading or their .idx files do not match (run im2rec-tools verify)") from None
        self._served += 1
        if self._served == self.num_batches:
            pad = self.batch_size - self._valid_in_last
            if pad:
                data, label = batch.data[0], batch.label[0]
                data[self._valid_in_last:] = mx.nd.broadcast_to(data[0:1], shape=(pad,) + data.shape[1:])
                label[self._valid_in_last:] = label[0].asscalar()
            batch.pad = pad
            self._source = None  # release the C++ iterator and its threads
        return batch


def _record_iter(rec_paths: str | Sequence[str], batch_size: int, data_shape: tuple[int, int, int],
                 index_dir: str | None, **kwargs) -> Callable[[], mx.io.DataIter]:
    """A factory of ImageRecordIters over all shards (one merged index: MXNet takes only one ``path_imgidx``)."""
    try:
        used, index = merged_index(_as_paths(rec_paths), index_dir)
    except ShardError as e:
        raise DataError(str(e)) from None

    def make() -> mx.io.DataIter:
        return mx.io.ImageRecordIter(path_imgrec=";".join(used), path_imgidx=index, data_shape=data_shape,
                                     batch_size=batch_size, label_width=1, round_batch=False, verbose=False,
                                     data_name="data", label_name="softmax_label", **kwargs)
    return make


def train_iter(rec_paths: str | Sequence[str], batch_size: int, data_shape: Sequence[int] = (3, 299, 299), *,
               epoch: int = 0, seed: int = 0, num_parts: int = 1, part_index: int = 0,
               mean: Sequence[float] = (127.5,) * 3, std: Sequence[float] = (127.5,) * 3,
               min_area: float = 0.08, max_area: float = 1.0, aspect_ratio: Sequence[float] = (3 / 4, 4 / 3),
               mirror: bool = True, color_jitter: float = 0.0, pca_noise: float = 0.0, preprocess_threads: int = 4,
               prefetch_buffer: int = 4, inter_method: int = 1, index_dir: str | None = None) -> mx.io.DataIter:
    """One training epoch of part ``part_index`` of ``num_parts``: ``num_train_batches`` full batches, no padding.

    ``mean``/``std`` are per channel in RGB order on 0..255 pixels. ``inter_method`` is OpenCV's (1 bilinear,
    2 bicubic, 9 auto, 10 random). ``index_dir`` holds the merged shard index (default: a per-user temp folder).
    """
    shape = _check_shape(data_shape)
    _check_parts(batch_size, num_parts, part_index)
    if not 0 < min_area <= max_area <= 1 or not 0 < aspect_ratio[0] <= aspect_ratio[1]:
        raise ValueError(f"need 0 < min_area <= max_area <= 1 and 0 < aspect_ratio[0] <= aspect_ratio[1], got "
                         f"area {min_area}..{max_area}, aspect {tuple(aspect_ratio)}")
    plan = epoch_plan(rec_paths, batch_size, num_parts)
    if plan.batches_per_part == 0:
        raise DataError(f"{plan.records} records are too few for batch_size {batch_size} on {num_parts} parts (the "
                        f"smallest part has {min(plan.part_sizes)}): lower the batch size or pack more images")
    shuffle_seed, aug_seed = _epoch_seeds(seed, epoch, num_parts, part_index)
    make = _record_iter(
        rec_paths, batch_size, shape, index_dir, shuffle=True, seed=shuffle_seed, seed_aug=aug_seed,
        num_parts=num_parts, part_index=part_index, preprocess_threads=preprocess_threads,
        prefetch_buffer=prefetch_buffer, random_resized_crop=True, min_random_area=min_area,
        max_random_area=max_area, min_aspect_ratio=aspect_ratio[0], max_aspect_ratio=aspect_ratio[1],
        rand_mirror=mirror, brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
        pca_noise=pca_noise, inter_method=inter_method, **_normalisation(mean, std))
    return _BatchCountIter(make, plan.batches_per_part, batch_size, shape)


def val_resize(size: int, crop_pct: float) -> int:
    """Shorter side before the centre crop: ``floor(size / crop_pct)`` (333 for 299 at 0.8975)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return int(math.floor(size / crop_pct + 1e-6))


def val_iter(rec_paths: str | Sequence[str], batch_size: int, data_shape: Sequence[int] = (3, 299, 299), *,
             crop_pct: float = 0.8975, mean: Sequence[float] = (127.5,) * 3, std: Sequence[float] = (127.5,) * 3,
             num_parts: int = 1, part_index: int = 0, preprocess_threads: int = 4, prefetch_buffer: int = 4,
             index_dir: str | None = None) -> mx.io.DataIter:
    """Evaluation batches of part ``part_index``: every record once across parts; the last batch reports ``pad``."""
    shape = _check_shape(data_shape)
    _check_parts(batch_size, num_parts, part_index)
    resize = val_resize(max(shape[1:]), crop_pct)
    n = count_records(rec_paths)
    if n == 0:
        raise DataError("the shards hold no records")
    size = part_sizes(n, num_parts)[part_index]
    make = _record_iter(rec_paths, batch_size, shape, index_dir, shuffle=False, num_parts=num_parts,
                        part_index=part_index, preprocess_threads=preprocess_threads, prefetch_buffer=prefetch_buffer,
                        resize=resize, **_normalisation(mean, std))
    num_batches = -(-size // batch_size)
    return _BatchCountIter(make, num_batches, batch_size, shape, size - (num_batches - 1) * batch_size)


class _SyntheticIter(mx.io.DataIter):
    def __init__(self, data: mx.nd.NDArray, label: mx.nd.NDArray, num_batches: int):
        super().__init__(data.shape[0])
        self._data, self._label, self.num_batches, self._served = data, label, num_batches, 0
        self.provide_data = [mx.io.DataDesc("data", data.shape, np.float32)]
        self.provide_label = [mx.io.DataDesc("softmax_label", label.shape, np.float32)]

    def __len__(self) -> int:
        return self.num_batches

    def reset(self) -> None:
        self._served = 0

    def next(self) -> mx.io.DataBatch:
        if self._served >= self.num_batches:
            raise StopIteration
        self._served += 1
        return mx.io.DataBatch([self._data], [self._label], pad=0, provide_data=self.provide_data,
                               provide_label=self.provide_label)


def synthetic_iter(batch_size: int, data_shape: Sequence[int], num_classes: int, num_batches: int,
                   seed: int = 0) -> mx.io.DataIter:
    """``num_batches`` copies of one random normal batch with labels in ``0..num_classes-1`` (no decoding cost)."""
    shape = _check_shape(data_shape)
    rng = np.random.RandomState(seed)
    data = mx.nd.array(rng.standard_normal((batch_size,) + shape).astype(np.float32))
    label = mx.nd.array(rng.randint(0, num_classes, batch_size).astype(np.float32))
    return _SyntheticIter(data, label, num_batches)
