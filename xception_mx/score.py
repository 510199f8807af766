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
import warnings

import mxnet as mx
import numpy as np

from . import data
from .errors import UserError
from .evaluate import evaluate
from .fileio import atomic_write_text
from .model import MIN_INPUT_SIZE
from .protocol import Preprocess
from .records import check_checksums, read_classes
from .runfolder import numbered_files

__all__ = ["load_exported", "prepare", "can_fuse", "score", "benchmark", "predict", "export_protocol",
           "write_confusion_csv"]

log = logging.getLogger("xception_mx.score")


def load_exported(prefix: str, epoch: int, ctx: list[mx.Context]) -> mx.gluon.SymbolBlock:
    """``SymbolBlock.imports`` of an export, with one-line errors for missing or mismatched files."""
    symbol_file, params_file = f"{prefix}-symbol.json", f"{prefix}-{epoch:04d}.params"
    if not os.path.isfile(symbol_file):
        raise UserError(f"{symbol_file} not found: --model-prefix must name the files PREFIX-symbol.json and "
                         f"PREFIX-NNNN.params (without the suffixes)")
    if not os.path.isfile(params_file):
        have = ", ".join(str(e) for e in numbered_files(prefix, ".params")) or "none"
        raise UserError(f"{params_file} not found; epochs that exist for {prefix}: {have}")
    for path in (symbol_file, params_file):
        if os.path.getsize(path) == 0:
            raise UserError(f"{path} is empty (0 bytes): the export was cut short; use another epoch")
    try:
        with warnings.catch_warnings():  # MXNet warns that it cannot infer the input type before the first call
            warnings.simplefilter("ignore")
            net = mx.gluon.SymbolBlock.imports(symbol_file, ["data"], params_file, ctx=ctx)
    except (AssertionError, mx.base.MXNetError, ValueError, KeyError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{params_file} does not match {symbol_file} ({detail[:200]}): use the params file "
                         f"exported with that symbol") from None
    with open(symbol_file, encoding="utf-8") as f:
        net.partitioned = "_sg_mkldnn" in f.read()  # an INT8 (or already fused) export: nothing left to fuse
    return net


def can_fuse(ctx: list[mx.Context]) -> bool:
    """oneDNN graph fusion applies: CPU contexts and an MXNet build with oneDNN (MKLDNN)."""
    return all(c.device_type == "cpu" for c in ctx) and mx.runtime.Features().is_enabled("MKLDNN")


def prepare(net, data_shape: tuple[int, int, int], ctx: list[mx.Context], fuse: bool = True) -> bool:
    """Hybridize ``net`` and, on CPU, let oneDNN fuse it (conv + BN + ReLU + sum into one kernel each). MXNet 1.9.1
    takes the backend name 'MKLDNN' ('ONEDNN', MXNet 2's, is ignored with a log line). Returns whether it fused."""
    net.hybridize(static_alloc=True)
    if not (fuse and can_fuse(ctx) and not getattr(net, "partitioned", False)):
        return False
    net.optimize_for(mx.nd.zeros((1, *data_shape), ctx=ctx[0]), backend="MKLDNN", static_alloc=True)
    return True


def _probe(net, data_shape: tuple[int, int, int], ctx: mx.Context) -> int:
    """Run one zero image through the net: checks the shape and returns the number of classes."""
    if data_shape[1] < MIN_INPUT_SIZE or data_shape[2] < MIN_INPUT_SIZE:
        raise UserError(f"--data-shape {','.join(map(str, data_shape))}: Xception needs at least "
                         f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels")
    try:
        out = net(mx.nd.zeros((1, *data_shape), ctx=ctx))
        out.wait_to_read()
    except mx.base.MXNetError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"--data-shape {','.join(map(str, data_shape))} does not fit the model ({first})") from None
    if out.ndim != 2:
        raise UserError(f"the model's output has shape {out.shape}, expected (batch, classes)")
    return out.shape[1]


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


def score(prefix: str, epoch: int, rec: str, ctx: list[mx.Context], batch_size: int,
          data_shape: tuple[int, int, int], pre: Preprocess, per_class: bool = False,
          classes: str | None = None, preprocess_threads: int = 4, progress: bool = True,
          verify_checksums: bool = False, fuse: bool = True) -> dict:
    """Top-1, top-5, mean cross-entropy, image count and images/s over every image of ``rec`` once."""
    shards = data.find_shards(rec)
    data.check_records(shards)
    unverifiable = check_checksums(shards, verify=verify_checksums)
    if unverifiable:
        log.info("%d of %d shards have no .crc checksum file: they cannot be checksum-verified", len(unverifiable),
                 len(shards))
    net = load_exported(prefix, epoch, ctx)
    num_classes = _probe(net, data_shape, ctx[0])
    fused = prepare(net, data_shape, ctx, fuse)
    total = data.count_records(shards)
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
        "num_classes": num_classes, "fused": fused,
    }
    if per_class:
        names = read_classes(classes, num_classes)
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
    atomic_write_text(path, text.getvalue())


def benchmark(prefix: str, epoch: int, ctx: list[mx.Context], batch_sizes: list[int],
              data_shape: tuple[int, int, int], warmup: int = 3, repeats: int = 10, fuse: bool = True) -> list[dict]:
    """Images/s and ms/batch on synthetic input for each batch size (synchronised with ``wait_to_read``)."""
    net = load_exported(prefix, epoch, ctx)
    _probe(net, data_shape, ctx[0])
    prepare(net, data_shape, ctx, fuse)
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
                     "best_ms_per_batch": 1000 * min(times)})
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


def predict(prefix: str, epoch: int, images: list[str], ctx: mx.Context, data_shape, pre: Preprocess,
            classes: str | None = None, top_k: int = 5, fuse: bool = True) -> list[dict]:
    """Each image's top-k classes with softmax probabilities, under the validation protocol."""
    net = load_exported(prefix, epoch, [ctx])
    num_classes = _probe(net, data_shape, ctx)
    prepare(net, data_shape, [ctx], fuse)
    names = read_classes(classes, num_classes)
    results = []
    for path in images:
        x = _load_image(path, data_shape, pre).as_in_context(ctx)
        probs = mx.nd.softmax(net(x)).asnumpy()[0]
        order = np.argsort(-probs)[:min(top_k, num_classes)]
        results.append({"image": path, "top": [{"class": int(c), "name": names[c], "prob": float(probs[c])}
                                               for c in order]})
    return results
