"""Decode + augment throughput at 299 px: MXNet's ImageRecordIter (``xception_mx.data.train_iter``) against Gluon's
``ImageRecordDataset`` + ``DataLoader`` with the same transforms, on the same shards.

The shards come from ``../shared/data/imagenet-sample`` (1,000 real ImageNet JPEGs) shrunk to shorter side 350 when
that folder exists, else from synthetic 500x375 JPEGs. One warm-up epoch, then ``--repeats`` timed epochs per
setting; reports images/s of the fastest and of the median epoch.

    .venv/bin/python benchmarks/bench_data.py [--workers 1,2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import cv2
import mxnet as mx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from im2rec_tools.listing import make_lists  # noqa: E402
from im2rec_tools.packing import pack  # noqa: E402
from xception_mx import data  # noqa: E402

DEFAULT_IMAGES = os.path.join(REPO, "..", "shared", "data", "imagenet-sample")
SIZE = 299


def build_shards(work: str, images: str, resize: int, shards: int) -> tuple[str, str]:
    """(shard prefix, description of the images)."""
    if os.path.isdir(images):
        names = sorted(n for n in os.listdir(images) if n.lower().endswith((".jpeg", ".jpg", ".png")))
        with open(os.path.join(work, "labels.csv"), "w") as f:
            f.writelines(f"{n},{n.split('_')[0]}\n" for n in names)
        make_lists(images, os.path.join(work, "bench"), val_ratio=0, labels_csv=os.path.join(work, "labels.csv"))
        root, what = images, f"{len(names)} ImageNet JPEGs from {os.path.relpath(images, REPO)}"
    else:
        rng = np.random.RandomState(0)
        root = os.path.join(work, "synthetic")
        for i in range(1000):
            os.makedirs(os.path.join(root, f"c{i % 10}"), exist_ok=True)
            noise = cv2.resize(rng.randint(0, 255, (24, 32, 3)).astype(np.uint8), (500, 375))
            cv2.imwrite(os.path.join(root, f"c{i % 10}", f"{i}.jpg"), noise, [cv2.IMWRITE_JPEG_QUALITY, 90])
        make_lists(root, os.path.join(work, "bench"), val_ratio=0)
        what = "1000 synthetic 500x375 JPEGs"
    prefix = os.path.join(work, "shards", "bench")
    pack(os.path.join(work, "bench.lst"), prefix, root, shards=shards, resize=resize, quality=95,
         workers=min(2, os.cpu_count() or 1), progress=False)
    return prefix, f"{what}, packed with --resize {resize} into {shards} shards"


class _Concat(mx.gluon.data.Dataset):
    """Shards as one dataset (Gluon's ImageRecordDataset reads one .rec)."""

    def __init__(self, parts):
        self._parts, self._ends = parts, np.cumsum([len(p) for p in parts])

    def __len__(self):
        return int(self._ends[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self._ends, i, side="right"))
        return self._parts[k][i - (int(self._ends[k - 1]) if k else 0)]


def gluon_loader(rec_paths, batch_size: int, workers: int):
    from mxnet.gluon.data.vision import ImageRecordDataset
    from mxnet.gluon.data.vision import transforms as T

    augment = T.Compose([T.RandomResizedCrop(SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)), T.RandomFlipLeftRight(),
                         T.ToTensor(), T.Normalize(0.5, 0.5)])  # same crop, flip and [-1, 1] scaling as train_iter
    dataset = _Concat([ImageRecordDataset(p).transform_first(augment) for p in rec_paths])
    return mx.gluon.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, last_batch="discard",
                                    num_workers=workers)


def epoch_images(batches) -> int:
    n = 0
    for batch in batches:
        x = batch.data[0] if isinstance(batch, mx.io.DataBatch) else batch[0]
        x.wait_to_read()
        n += x.shape[0]
    return n


def measure(make_epoch, repeats: int) -> tuple[float, float, int]:
    """(images/s of the fastest epoch, of the median epoch, images per epoch) after one warm-up epoch."""
    epoch_images(make_epoch(0))
    times, n = [], 0
    for r in range(repeats):
        start = time.perf_counter()
        n = epoch_images(make_epoch(r + 1))
        times.append(time.perf_counter() - start)
    return n / min(times), n / statistics.median(times), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=DEFAULT_IMAGES)
    parser.add_argument("--workers", default="1,2", help="thread / worker counts to try (default 1,2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resize", type=int, default=350)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_data-")
    try:
        prefix, what = build_shards(work, args.images, args.resize, args.shards)
        recs = data.find_shards(prefix)
        print(f"data: {what}; batch {args.batch_size}; output (B, 3, {SIZE}, {SIZE}) float32; "
              f"{os.cpu_count()} CPUs; warm-up 1 epoch, {args.repeats} timed epochs\n")
        print("| pipeline | threads / workers | images/s (best) | images/s (median) | images per epoch |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for w in (int(x) for x in args.workers.split(",")):
            rows = [("ImageRecordIter (`data.train_iter`)", lambda e, w=w: data.train_iter(
                        recs, args.batch_size, (3, SIZE, SIZE), epoch=e, preprocess_threads=w)),
                    ("ImageRecordDataset + DataLoader", lambda e, w=w: gluon_loader(recs, args.batch_size, w))]
            for name, make in rows:
                best, median, n = measure(make, args.repeats)
                print(f"| {name} | {w} | {best:.0f} | {median:.0f} | {n} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
