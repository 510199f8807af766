"""xception_mx.data: shard lookup, epoch plans, and the train/val iterators over real packed shards."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from im2rec_tools.listing import make_lists, read_lst
from im2rec_tools.packing import pack
from shard_factory import identify, textured, write_tree
from xception_mx import data
from xception_mx.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["ant", "bee", "cat"]
PLAIN = dict(mean=(0, 0, 0), std=(1, 1, 1))  # pixel values stay 0..255
SHAPE = (3, 24, 24)


def _build(root, per_class: int, shards: int, flat: bool = True, size: int = 32):
    """Images -> make-list (one shuffled list) -> pack; returns (prefix, {identity: label}, list entries)."""
    made = write_tree(str(root / "images"), CLASSES, per_class, size=size, flat=flat)
    make_lists(str(root / "images"), str(root / "all"), val_ratio=0)
    pack(str(root / "all.lst"), str(root / "shards" / "train"), str(root / "images"), shards=shards, progress=False)
    labels = {identity: CLASSES.index(name) for identity, name in made.values()}
    return str(root / "shards" / "train"), labels, read_lst(str(root / "all.lst"))


@pytest.fixture(scope="module")
def flat_shards(tmp_path_factory):
    """48 flat-colour images of 3 classes in 3 shards; returns (prefix, {identity: label}, identities in list order)."""
    root = tmp_path_factory.mktemp("flat")
    prefix, labels, entries = _build(root, per_class=16, shards=3)
    return prefix, labels, [_identity_of(e.path) for e in entries]


def _identity_of(path: str) -> int:
    return int(os.path.basename(path)[3:6])


def _identities(batch, count, pad=0):
    data, label = batch.data[0].asnumpy(), batch.label[0].asnumpy()
    keep = data.shape[0] - pad
    return [identify(img, count) for img in data[:keep]], label[:keep].tolist()


def _epoch(it, count):
    ids, labels, pads = [], [], []
    for batch in it:
        i, l = _identities(batch, count, batch.pad)
        ids += i
        labels += l
        pads.append(batch.pad)
    return ids, labels, pads


# ----------------------------------------------------------------------------------------------------- shards

def test_find_shards_accepts_prefix_glob_file_and_lists(flat_shards):
    prefix, *_ = flat_shards
    expected = [os.path.abspath(f"{prefix}-{i:05d}-of-00003.rec") for i in range(3)]
    assert data.find_shards(prefix) == expected
    assert data.find_shards(prefix + "-*.rec") == expected
    assert data.find_shards(expected[1]) == [expected[1]]
    assert data.find_shards(f"{expected[2]};{expected[0]}") == [expected[0], expected[2]]


def test_find_shards_names_what_is_wrong(tmp_path, flat_shards):
    prefix, *_ = flat_shards
    with pytest.raises(UserError, match="no shards for prefix"):
        data.find_shards(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="no .rec files match"):
        data.find_shards(str(tmp_path / "x-*.rec"))
    copy = tmp_path / "copy"
    copy.mkdir()
    for i in range(3):
        for ext in ("rec", "idx"):
            src = f"{prefix}-{i:05d}-of-00003.{ext}"
            (copy / os.path.basename(src)).write_bytes(open(src, "rb").read())
    os.remove(copy / "train-00001-of-00003.idx")
    with pytest.raises(UserError, match=r"train-00001-of-00003.rec has no index train-00001-of-00003.idx"):
        data.find_shards(str(copy / "train"))
    os.remove(copy / "train-00001-of-00003.rec")
    with pytest.raises(UserError, match=r"train-00001-of-00003.rec is missing"):
        data.find_shards(str(copy / "train-*.rec"))
    # a shard from an older pack with another shard count must not slip in
    (copy / "train-00000-of-00002.rec").write_bytes(b"")
    (copy / "train-00000-of-00002.idx").write_bytes(b"")
    with pytest.raises(UserError, match="two different packs"):
        data.find_shards(str(copy / "train"))


def test_truncated_shard_is_refused(tmp_path, flat_shards):
    prefix, *_ = flat_shards
    rec = open(f"{prefix}-00000-of-00003.rec", "rb").read()
    (tmp_path / "t.rec").write_bytes(rec[:-100])
    (tmp_path / "t.idx").write_bytes(open(f"{prefix}-00000-of-00003.idx", "rb").read())
    with pytest.raises(UserError, match="truncated"):
        data.count_records(str(tmp_path / "t.rec"))


def test_a_shard_emptied_by_skipped_files_is_left_out(tmp_path):
    """dmlc-core refuses a zero-byte .rec; the iterators must still read the other shards."""
    write_tree(str(tmp_path / "img"), ["a"], per_class=3)
    (tmp_path / "img" / "a" / "bad.jpg").write_text("not an image")
    (tmp_path / "l.lst").write_text("".join(f"{i}\t0\ta/{name}\n" for i, name in enumerate(
        ["img000.jpg", "img001.jpg", "img002.jpg", "bad.jpg"])))
    pack(str(tmp_path / "l.lst"), str(tmp_path / "s"), str(tmp_path / "img"), shards=4, progress=False)
    assert os.path.getsize(tmp_path / "s-00003-of-00004.rec") == 0
    assert data.count_records(str(tmp_path / "s")) == 3
    ids = _epoch(data.val_iter(str(tmp_path / "s"), 2, SHAPE, crop_pct=1.0, preprocess_threads=1, **PLAIN), 3)[0]
    assert sorted(ids) == [0, 1, 2]
    assert len(list(data.train_iter(str(tmp_path / "s"), 3, SHAPE, preprocess_threads=1))) == 1


def test_counts_and_epoch_plan(flat_shards):
    prefix, labels, _ = flat_shards
    assert data.count_records(prefix) == len(labels) == 48
    plan = data.epoch_plan(prefix, 4, num_parts=3)
    assert plan.part_sizes == (16, 16, 16)
    assert plan.batches_per_part == data.num_train_batches(data.find_shards(prefix), 4, 3) == 4
    assert plan.dropped_per_epoch == 0
    plan = data.epoch_plan(prefix, 5, num_parts=3)
    assert (plan.batches_per_part, plan.dropped_per_epoch) == (3, 48 - 45)
    assert data.part_sizes(10, 4) == [3, 3, 3, 1] and data.part_sizes(9, 4) == [3, 3, 3, 0]
    assert data.num_train_batches(prefix, 17, num_parts=3) == 0  # the trainer reports it; train_iter refuses


# -------------------------------------------------------------------------------------------------- iterators

def test_val_round_trip_content_labels_and_pad(tmp_path):
    """Pixels, labels and order survive make-list + pack (3 shards) + val_iter, and the partial batch is padded."""
    prefix, _, entries = _build(tmp_path, per_class=7, shards=3, flat=False, size=SHAPE[1])
    it = data.val_iter(prefix, 8, SHAPE, crop_pct=1.0, preprocess_threads=2, **PLAIN)
    # A batch's arrays are the iterator's buffers, valid until the next batch is read: kept ones are copies.
    batches = [mx.io.DataBatch([b.data[0].copy()], [b.label[0].copy()], pad=b.pad) for b in it]
    assert len(batches) == len(it) == 3 and [b.pad for b in batches] == [0, 0, 3]
    images = np.concatenate([b.data[0].asnumpy() for b in batches])
    labels = np.concatenate([b.label[0].asnumpy() for b in batches])
    for k, entry in enumerate(entries):  # val_iter keeps list order across the shards
        identity = _identity_of(entry.path)
        expected_rgb = textured(identity, SHAPE[1])[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
        assert labels[k] == entry.label
        assert np.abs(images[k] - expected_rgb).mean() < 2.5, f"pixels of {entry.path} changed"
    # padding rows repeat the first sample instead of holding stale data or garbage labels
    assert np.array_equal(images[21:], np.repeat(images[16:17], 3, axis=0))
    assert np.array_equal(labels[21:], np.repeat(labels[16:17], 3))
    assert batches[0].data[0].dtype == np.float32 and batches[0].label[0].shape == (8,)


def test_train_iter_yields_right_labels_full_batches_and_normalises(flat_shards):
    prefix, labels, _ = flat_shards
    it = data.train_iter(prefix, 5, SHAPE, epoch=0, preprocess_threads=2, **PLAIN)
    ids, got_labels, pads = _epoch(it, 48)
    assert len(pads) == data.num_train_batches(prefix, 5) == 9 and set(pads) == {0}
    assert len(set(ids)) == len(ids) == 45
    assert got_labels == [labels[i] for i in ids]
    batch = next(iter(data.train_iter(prefix, 5, SHAPE, preprocess_threads=2)))  # default: [-1, 1]
    values = batch.data[0].asnumpy()
    assert batch.data[0].shape == (5,) + SHAPE and -1.0 <= values.min() and values.max() <= 1.0


@pytest.mark.parametrize("num_parts, batch_size", [(3, 5), (5, 3)])  # parts of 16/16/16 and 10/10/10/10/8
def test_train_parts_partition_each_epoch(flat_shards, num_parts, batch_size):
    prefix, _, list_order = flat_shards
    plan = data.epoch_plan(prefix, batch_size, num_parts=num_parts)
    step = -(-48 // num_parts)
    seen = {}
    for epoch in (0, 1):
        ids = []
        for part in range(num_parts):
            it = data.train_iter(prefix, batch_size, SHAPE, epoch=epoch, num_parts=num_parts, part_index=part,
                                 preprocess_threads=2, **PLAIN)
            part_ids, _, pads = _epoch(it, 48)
            assert len(pads) == len(it) == plan.batches_per_part and set(pads) == {0}  # same count in every part
            assert set(part_ids) <= set(list_order[step * part:step * (part + 1)])  # MXNet's contiguous split
            ids += part_ids
        assert len(ids) == len(set(ids)) == 48 - plan.dropped_per_epoch  # no image in two parts
        seen[epoch] = set(ids)
    assert seen[0] != seen[1], "the dropped remainder should change between epochs"


@pytest.mark.parametrize("num_parts", [5, 13])  # 10/10/10/10/8, and 4 x 12 + an empty 13th part
def test_val_parts_cover_every_image_exactly_once(flat_shards, num_parts):
    prefix, *_ = flat_shards
    ids = []
    for part in range(num_parts):
        it = data.val_iter(prefix, 3, SHAPE, crop_pct=1.0, num_parts=num_parts, part_index=part,
                           preprocess_threads=2, **PLAIN)
        part_ids, _, pads = _epoch(it, 48)
        size = data.part_sizes(48, num_parts)[part]
        assert len(part_ids) == size and len(pads) == len(it) == -(-size // 3)  # an empty part is never built
        ids += part_ids
    assert sorted(ids) == list(range(48))


def test_order_depends_only_on_seed_epoch_and_part(flat_shards):
    prefix, *_ = flat_shards

    def run(**kw):
        it = data.train_iter(prefix, 4, SHAPE, preprocess_threads=2, **PLAIN, **kw)
        return np.concatenate([b.data[0].asnumpy() for b in it])

    first = run(epoch=3, seed=1)
    assert np.array_equal(first, run(epoch=3, seed=1))  # same pixels, so same order and same augmentation
    order = [identify(x, 48) for x in first]
    assert order != [identify(x, 48) for x in run(epoch=4, seed=1)]
    assert order != [identify(x, 48) for x in run(epoch=3, seed=2)]


def test_reset_replays_the_same_epoch(flat_shards):
    prefix, *_ = flat_shards
    it = data.train_iter(prefix, 4, SHAPE, epoch=2, preprocess_threads=2)
    first = [b.data[0].asnumpy() for b in it]
    it.reset()
    assert all(np.array_equal(a, b.data[0].asnumpy()) for a, b in zip(first, it))


_RESUMED = """
import hashlib, sys
sys.path.insert(0, {tests!r})
from xception_mx import data
it = data.train_iter({prefix!r}, 4, {shape!r}, epoch=2, seed=5, preprocess_threads=2)
print(hashlib.sha1(b"".join(b.data[0].asnumpy().tobytes() + b.label[0].asnumpy().tobytes() for b in it)).hexdigest())
"""


def test_resumed_epoch_matches_uninterrupted_run(flat_shards):
    """A fresh process starting at epoch 2 sees the same batches as a process that ran epochs 0 and 1 first."""
    prefix, *_ = flat_shards
    digest = None
    for epoch in range(3):
        it = data.train_iter(prefix, 4, SHAPE, epoch=epoch, seed=5, preprocess_threads=2)
        digest = hashlib.sha1(b"".join(b.data[0].asnumpy().tobytes() + b.label[0].asnumpy().tobytes()
                                       for b in it)).hexdigest()
    code = _RESUMED.format(tests=os.path.dirname(__file__), prefix=prefix, shape=SHAPE)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == digest


def test_train_iter_refuses_too_few_records(flat_shards):
    prefix, *_ = flat_shards
    with pytest.raises(UserError, match="too few"):
        data.train_iter(prefix, 20, SHAPE, num_parts=3)
    with pytest.raises(ValueError):
        data.train_iter(prefix, 4, SHAPE, num_parts=3, part_index=3)


def test_val_resize_matches_timm_crop():
    assert data.val_resize(299, 0.8975) == 333
    assert data.val_resize(224, 0.875) == 256
    assert data.val_resize(32, 1.0) == 32


def test_check_labels():
    data.check_labels(np.array([0.0, 2.0, 9.0]), 10)
    for bad in ([10.0], [-1.0], [1.5], [float("nan")]):
        with pytest.raises(UserError, match="outside 0..9"):
            data.check_labels(np.array(bad), 10)


def test_synthetic_iter():
    it = data.synthetic_iter(3, (3, 16, 16), num_classes=4, num_batches=5, seed=1)
    batches = list(it)
    assert len(batches) == 5 and batches[0].data[0].shape == (3, 3, 16, 16)
    labels = batches[0].label[0].asnumpy()
    assert labels.shape == (3,) and labels.min() >= 0 and labels.max() < 4
    it.reset()
    assert len(list(it)) == 5
