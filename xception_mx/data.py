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
Batches: ``data[0]`` (B, C, H, W) float32, ``label[0]`` (B,) float32. A batch's arrays are the iterator's own
buffers, valid until the next batch is read (as with any MXNet ``DataIter``): copy them to keep them (``list(it)``
does not).

MXNet 1.9.1 ImageRecordIter quirks are handled here, each with a test in tests/test_data.py; ARCHITECTURE.md lists
them. The record order does not depend on ``preprocess_threads``.

Memory: a C++ ImageRecordIter freed before it reached its end, or built with ``prefetch_buffer`` > 1, never frees
its batch buffers (apache/mxnet#15218; measured here: 4 batches per iterator at the default prefetch of 4, so an
ImageNet epoch at batch 64 would keep 275 MB). Each epoch's iterators are therefore built with one batch of
prefetch (it is still read ahead while the network trains: ``DEFAULT_PREFETCH``) and read to their end before they
are dropped; the last batch served is a copy, since reading on overwrites it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import mxnet as mx
import numpy as np

from im2rec_tools.shards import merged_index

from .errors import UserError
from .protocol import val_resize
from .records import (
    EpochPlan,
    as_paths,
    check_labels,
    check_parts,
    check_records,
    count_records,
    derived_seeds,
    epoch_plan,
    find_shards,
    num_train_batches,
    part_sizes,
)

# The MXNet-free shard functions live in records.py; they are re-exported so ``data`` is the one import for data.
__all__ = ["EpochPlan", "find_shards", "check_records", "count_records", "epoch_plan", "num_train_batches",
           "part_sizes", "check_labels", "derived_seeds", "train_iter", "val_iter", "synthetic_iter", "val_resize"]


# ---------------------------------------------------------------------------------------------------- iterators

def _check_shape(data_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(x) for x in data_shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 1:
        raise ValueError(f"data_shape must be (channels 1 or 3, height, width), got {tuple(data_shape)}")
    return shape  # a tuple[int, int, int] after the length check


def _normalisation(mean: Sequence[float], std: Sequence[float]) -> dict[str, float]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values (RGB) and std > 0, got mean={mean}, std={std}")
    return dict(mean_r=mean[0], mean_g=mean[1], mean_b=mean[2], std_r=std[0], std_g=std[1], std_b=std[2])


#: Batches the C++ iterator prepares ahead: 1 is the only value whose buffers are all freed (see above).
DEFAULT_PREFETCH = 1


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

    def _release(self) -> None:
        """Read the C++ iterator to its end, then drop it: only then are its buffers freed (apache/mxnet#15218)."""
        source, self._source = self._source, None
        try:
            while source is not None:
                source.next()
        except StopIteration:
            pass

    def next(self) -> mx.io.DataBatch:
        if self._served >= self.num_batches:
            raise StopIteration
        if self._source is None:
            self._source = self._make()
        try:
            batch = self._source.next()
        except StopIteration:
            raise UserError(f"the shards ran out after {self._served} of {self.num_batches} batches: they changed "
                            f"while reading or their .idx files do not match (run im2rec-tools verify)") from None
        self._served += 1
        if self._served == self.num_batches:
            pad = self.batch_size - self._valid_in_last
            if pad:
                data, label = batch.data[0], batch.label[0]
                data[self._valid_in_last:] = mx.nd.broadcast_to(data[0:1], shape=(pad,) + data.shape[1:])
                label[self._valid_in_last:] = label[0].asscalar()
            batch = mx.io.DataBatch([batch.data[0].copy()], [batch.label[0].copy()], pad=pad)  # reading on reuses it
            self._release()
        return batch


def _record_iter(rec_paths: str | Sequence[str], batch_size: int, data_shape: tuple[int, int, int],
                 index_dir: str | None, **kwargs) -> Callable[[], mx.io.DataIter]:
    """A factory of ImageRecordIters over all shards (one merged index: MXNet takes only one ``path_imgidx``)."""
    used, index = merged_index(as_paths(rec_paths), index_dir)

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
               prefetch_buffer: int = DEFAULT_PREFETCH, inter_method: int = 1, index_dir: str | None = None
               ) -> mx.io.DataIter:
    """One training epoch of part ``part_index`` of ``num_parts``: ``num_train_batches`` full batches, no padding.

    ``mean``/``std`` are per channel in RGB order on 0..255 pixels. ``inter_method`` is OpenCV's (1 bilinear,
    2 bicubic, 9 auto, 10 random). ``index_dir`` holds the merged shard index (default: a per-user temp folder).
    """
    shape = _check_shape(data_shape)
    check_parts(batch_size, num_parts, part_index)
    if not 0 < min_area <= max_area <= 1 or not 0 < aspect_ratio[0] <= aspect_ratio[1]:
        raise ValueError(f"need 0 < min_area <= max_area <= 1 and 0 < aspect_ratio[0] <= aspect_ratio[1], got "
                         f"area {min_area}..{max_area}, aspect {tuple(aspect_ratio)}")
    plan = epoch_plan(rec_paths, batch_size, num_parts)
    if plan.batches_per_part == 0:
        raise UserError(f"{plan.records} records are too few for batch_size {batch_size} on {num_parts} parts (the "
                        f"smallest part has {min(plan.part_sizes)}): lower the batch size or pack more images")
    shuffle_seed, aug_seed = derived_seeds(seed, epoch, num_parts, part_index, n=2)
    make = _record_iter(
        rec_paths, batch_size, shape, index_dir, shuffle=True, seed=shuffle_seed, seed_aug=aug_seed,
        num_parts=num_parts, part_index=part_index, preprocess_threads=preprocess_threads,
        prefetch_buffer=prefetch_buffer, random_resized_crop=True, min_random_area=min_area,
        max_random_area=max_area, min_aspect_ratio=aspect_ratio[0], max_aspect_ratio=aspect_ratio[1],
        rand_mirror=mirror, brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
        pca_noise=pca_noise, inter_method=inter_method, **_normalisation(mean, std))
    return _BatchCountIter(make, plan.batches_per_part, batch_size, shape)


def val_iter(rec_paths: str | Sequence[str], batch_size: int, data_shape: Sequence[int] = (3, 299, 299), *,
             crop_pct: float = 0.8975, mean: Sequence[float] = (127.5,) * 3, std: Sequence[float] = (127.5,) * 3,
             num_parts: int = 1, part_index: int = 0, preprocess_threads: int = 4,
             prefetch_buffer: int = DEFAULT_PREFETCH,
             inter_method: int = 1, index_dir: str | None = None) -> mx.io.DataIter:
    """Evaluation batches of part ``part_index``: every record once across parts; the last batch reports ``pad``.

    ``inter_method`` is the resize's OpenCV interpolation (1 bilinear, 2 bicubic; see ``protocol.INTERPOLATIONS``).
    """
    shape = _check_shape(data_shape)
    check_parts(batch_size, num_parts, part_index)
    resize = val_resize(max(shape[1:]), crop_pct)
    n = count_records(rec_paths)
    if n == 0:
        raise UserError("the shards hold no records")
    size = part_sizes(n, num_parts)[part_index]
    make = _record_iter(rec_paths, batch_size, shape, index_dir, shuffle=False, num_parts=num_parts,
                        part_index=part_index, preprocess_threads=preprocess_threads, prefetch_buffer=prefetch_buffer,
                        resize=resize, inter_method=inter_method, **_normalisation(mean, std))
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
