"""Score an exported checkpoint (``PREFIX-symbol.json`` + ``PREFIX-NNNN.params``) without the model code.

Protocol (the trainer's validation, recorded in every JSON report; see ``protocol.Preprocess``, read from the
``PREFIX-preprocess.json`` beside the export): resize the shorter side to ``floor(size / crop_pct)`` with the
export's interpolation, centre-crop ``size`` x ``size``, RGB, subtract ``mean`` and divide by ``std`` per channel
(0-255 scale); every image once, the last batch's padding dropped. Imports neither the trainer nor gluoncv.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import statistics
import sys
import time

import mxnet as mx
import numpy as np

from . import data
from .errors import UserError
from .evaluate import evaluate
from .fileio import atomic_write_text, write_errors
from .inference import Speedups, ready
from .protocol import Preprocess
from .records import check_checksums, check_duplicates, read_classes
from .runfolder import classes_file

__all__ = ["score", "benchmark", "predict", "export_protocol", "class_names", "write_confusion_csv"]

log = logging.getLogger("xception_mx.score")


def export_protocol(prefix: str) -> Preprocess:
    """The protocol written beside the export (``PREFIX-preprocess.json``); for runs made before it existed, the
    training ``config.yaml`` in the same folder; else the defaults (299 px, crop 0.8975, [-1, 1], bilinear)."""
    saved = Preprocess.read(prefix)
    if saved is not None:
        return saved
    legacy = os.path.join(os.path.dirname(os.path.abspath(prefix)), "config.yaml")
    if os.path.isfile(legacy):
        import yaml

        with open(legacy, encoding="utf-8") as f:
            return Preprocess.from_dict(yaml.safe_load(f) or {})
    return Preprocess()


def class_names(prefix: str, classes: str | None, num_classes: int) -> list[str]:
    """Class names in label order (``runfolder.classes_file``), else the label numbers. A file naming another number
    of classes than the model's ``num_classes`` is one line."""
    return read_classes(classes_file(prefix, classes), num_classes)


def score(prefix: str, epoch: int, rec: str, ctx: list[mx.Context], batch_size: int,
          data_shape: tuple[int, int, int], pre: Preprocess, per_class: bool = False,
          classes: str | None = None, preprocess_threads: int = 4, progress: bool = True,
          verify_checksums: bool = False, speedups: Speedups = Speedups()) -> dict:  # noqa: B008 (frozen)
    """Top-1, top-5, mean cross-entropy, image count and images/s over every image of ``rec`` once."""
    shards = data.find_shards(rec)
    scan = data.check_records(shards)
    unverifiable = check_checksums(shards, verify=verify_checksums)
    check_duplicates(shards)
    if unverifiable:
        log.info("%d of %d shards have no .crc checksum file: they cannot be checksum-verified", len(unverifiable),
                 len(shards))
    loaded = ready(prefix, epoch, ctx, data_shape, speedups)
    net, num_classes = loaded.net, loaded.num_classes
    names = class_names(prefix, classes, num_classes)
    if scan.max_label >= num_classes:
        raise UserError(f"{scan.max_label_at} has label {scan.max_label}, outside 0..{num_classes - 1} (the model's "
                        f"classes): score it on the data it was trained for")
    total = data.count_records(shards)
    if total == 0:
        raise UserError(f"--rec {rec}: the shards hold no records ({', '.join(shards)}): give shards with images")
    val = data.val_iter(shards, batch_size, data_shape, crop_pct=pre.crop_pct, mean=pre.mean, std=pre.std,
                        inter_method=pre.inter_method, preprocess_threads=preprocess_threads)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="scoring", file=sys.stderr, disable=None)

    def on_batch(logits, labels):
        np.add.at(confusion, (labels, logits.argmax(axis=1)), 1)
        if bar is not None:
            bar.update(len(labels))

    start = time.time()
    acc = evaluate(net, val, ctx, num_classes, on_batch=on_batch)
    elapsed = time.time() - start
    if bar is not None:
        bar.close()
    result = {
        "model_prefix": prefix, "epoch": epoch, "rec": shards, "images": acc.count, "top1": acc.top(1),
        "top5": acc.top(5), "cross_entropy": acc.loss, "images_per_sec": acc.count / max(elapsed, 1e-9),
        "protocol": {"resize_shorter": data.val_resize(max(data_shape[1:]), pre.crop_pct),
                     "crop": list(data_shape[1:]), "crop_pct": pre.crop_pct, "interpolation": pre.interpolation,
                     "channel_order": "RGB", "mean": list(pre.mean), "std": list(pre.std), "each_image_once": True},
        **loaded.describe(),
    }
    if per_class:
        support = confusion.sum(axis=1)
        result["per_class"] = [{"class": i, "name": names[i], "images": int(support[i]),
                                "top1": float(confusion[i, i] / support[i]) if support[i] else None}
                               for i in range(num_classes)]
        result["confusion"] = confusion
    return result


def write_confusion_csv(path: str, confusion: np.ndarray, names: list[str]) -> None:
    """Rows: true class; columns: predicted class."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["true \\ predicted"] + names)
    for i, row in enumerate(confusion):
        writer.writerow([names[i]] + [int(v) for v in row])
    with write_errors(os.path.dirname(os.path.abspath(path)), f"the confusion matrix {path}"):
        atomic_write_text(path, text.getvalue())


def benchmark(prefix: str, epoch: int, ctx: list[mx.Context], batch_sizes: list[int],
              data_shape: tuple[int, int, int], warmup: int = 3, repeats: int = 10,
              speedups: Speedups = Speedups()) -> list[dict]:  # noqa: B008 (frozen)
    """Images/s and ms/batch on synthetic input for each batch size (synchronised with ``wait_to_read``)."""
    loaded = ready(prefix, epoch, ctx, data_shape, speedups)
    net = loaded.net
    rows = []
    for bs in batch_sizes:
        x = mx.nd.random.uniform(-1, 1, shape=(bs, *data_shape), ctx=ctx[0])
        for _ in range(warmup):
            net(x).wait_to_read()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x).wait_to_read()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        rows.append({"batch_size": bs, "images_per_sec": bs / median, "ms_per_batch": 1000 * median,
                     "best_ms_per_batch": 1000 * min(times), **loaded.describe()})
    return rows


def _load_image(path: str, data_shape, pre: Preprocess) -> mx.nd.NDArray:
    """The validation protocol on one file: shorter side to floor(size / crop_pct) (MXNet's imresize, i.e. OpenCV's
    cv::resize with INTER_LINEAR or INTER_CUBIC, as ImageRecordIter), centre crop, normalise."""
    if not os.path.isfile(path):
        raise UserError(f"image {path} not found")
    with open(path, "rb") as f:
        buf = f.read()
    try:
        img = mx.image.imdecode(buf, flag=1, to_rgb=True)  # HWC uint8 RGB
    except mx.base.MXNetError:
        raise UserError(f"{path} is not a readable image") from None
    size_h, size_w = data_shape[1], data_shape[2]
    img = mx.image.resize_short(img, data.val_resize(max(size_h, size_w), pre.crop_pct), interp=pre.inter_method)
    img, _ = mx.image.center_crop(img, (size_w, size_h))
    img = (img.astype("float32") - mx.nd.array(pre.mean)) / mx.nd.array(pre.std)
    return img.transpose((2, 0, 1)).expand_dims(0)


def image_files(paths: list[str]) -> list[str]:
    """``paths`` with each folder replaced by the images below it (any depth, sorted; the extensions
    ``im2rec-tools`` packs). A folder without images is one line."""
    from im2rec_tools.listing import is_image_name

    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if is_image_name(name))
        if not found:
            raise UserError(f"{path} is a folder with no images (.jpg, .jpeg, .png, .bmp) in it")
        files += found
    return files


def predict(prefix: str, epoch: int, images: list[str], ctx: mx.Context, data_shape, pre: Preprocess,
            classes: str | None = None, top_k: int = 5,
            speedups: Speedups = Speedups()) -> list[dict]:  # noqa: B008 (frozen)
    """Each image's top-k classes with softmax probabilities, under the validation protocol; a folder stands for
    the images in it (:func:`image_files`)."""
    images = image_files(images)
    loaded = ready(prefix, epoch, [ctx], data_shape, speedups)
    net, num_classes = loaded.net, loaded.num_classes
    names = class_names(prefix, classes, num_classes)
    results = []
    for path in images:
        x = _load_image(path, data_shape, pre).as_in_context(ctx)
        probs = mx.nd.softmax(net(x)).asnumpy()[0]
        order = np.argsort(-probs)[:min(top_k, num_classes)]
        results.append({"image": path, "top": [{"class": int(c), "name": names[c], "prob": float(probs[c])}
                                               for c in order]})
    return results
