"""Score an exported checkpoint (``PREFIX-symbol.json`` + ``PREFIX-NNNN.params``) without the model code.

Protocol (the trainer's validation, recorded in every JSON report): resize the shorter side to
``floor(size / crop_pct)`` (bilinear; 333 for 299 at the default 0.8975, as timm), centre-crop ``size`` x ``size``, RGB, subtract ``mean`` and divide by ``std``
per channel (0-255 scale); every image once, the last batch's padding dropped.
"""
from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
import statistics
import sys
import time
import warnings

import mxnet as mx
import numpy as np

from . import data
from .config import ConfigError
from .model import MIN_INPUT_SIZE

__all__ = ["load_exported", "score", "benchmark", "predict", "read_classes", "protocol_defaults", "ScoreError"]

log = logging.getLogger("xception_mx.score")


class ScoreError(ConfigError):
    """Bad input to scoring; one line for the user."""


def available_epochs(prefix: str) -> list[int]:
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"-(\d{4,})\.params$")
    found = []
    for path in glob.glob(glob.escape(prefix) + "-*.params"):
        match = pattern.match(os.path.basename(path))
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def load_exported(prefix: str, epoch: int, ctx: list[mx.Context]) -> mx.gluon.SymbolBlock:
    """``SymbolBlock.imports`` of an export, with one-line errors for missing or mismatched files."""
    symbol_file, params_file = f"{prefix}-symbol.json", f"{prefix}-{epoch:04d}.params"
    if not os.path.isfile(symbol_file):
        raise ScoreError(f"{symbol_file} not found: --model-prefix must name the files PREFIX-symbol.json and "
                         f"PREFIX-NNNN.params (without the suffixes)")
    if not os.path.isfile(params_file):
        have = ", ".join(str(e) for e in available_epochs(prefix)) or "none"
        raise ScoreError(f"{params_file} not found; epochs that exist for {prefix}: {have}")
    try:
        with warnings.catch_warnings():  # MXNet warns that it cannot infer the input type before the first call
            warnings.simplefilter("ignore")
            return mx.gluon.SymbolBlock.imports(symbol_file, ["data"], params_file, ctx=ctx)
    except (AssertionError, mx.base.MXNetError, ValueError, KeyError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScoreError(f"{params_file} does not match {symbol_file} ({detail[:200]}): use the params file "
                         f"exported with that symbol") from None


def _probe(net, data_shape: tuple[int, int, int], ctx: mx.Context) -> int:
    """Run one zero image through the net: checks the shape and returns the number of classes."""
    if data_shape[1] < MIN_INPUT_SIZE or data_shape[2] < MIN_INPUT_SIZE:
        raise ScoreError(f"--data-shape {','.join(map(str, data_shape))}: Xception needs at least "
                         f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels")
    try:
        out = net(mx.nd.zeros((1, *data_shape), ctx=ctx))
        out.wait_to_read()
    except mx.base.MXNetError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise ScoreError(f"--data-shape {','.join(map(str, data_shape))} does not fit the model ({first})") from None
    if out.ndim != 2:
        raise ScoreError(f"the model's output has shape {out.shape}, expected (batch, classes)")
    return out.shape[1]


def protocol_defaults(prefix: str) -> dict:
    """Preprocessing recorded beside the checkpoint (the trainer's config.yaml), if any."""
    import yaml

    path = os.path.join(os.path.dirname(os.path.abspath(prefix)), "config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    out = {}
    if "input_size" in cfg:
        out["data_shape"] = (3, int(cfg["input_size"]), int(cfg["input_size"]))
    for key in ("crop_pct", "mean", "std"):
        if key in cfg:
            out[key] = cfg[key]
    return out


def read_classes(path: str | None, num_classes: int) -> list[str]:
    """Class names from im2rec_tools' classes.txt (``index<TAB or space>name`` per line), else the indices."""
    names = [str(i) for i in range(num_classes)]
    if not path:
        return names
    if not os.path.isfile(path):
        raise ScoreError(f"--classes {path} not found")
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.strip().split(None, 1)
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) < num_classes:
                names[int(parts[0])] = parts[1]
    return names


def score(prefix: str, epoch: int, rec: str, ctx: list[mx.Context], batch_size: int,
          data_shape: tuple[int, int, int], crop_pct: float, mean, std, per_class: bool = False,
          classes: str | None = None, preprocess_threads: int = 4, progress: bool = True) -> dict:
    """Top-1, top-5, mean cross-entropy, image count and images/s over every image of ``rec`` once."""
    from .train import evaluate

    shards = data.find_shards(rec)
    data.check_records(shards)
    net = load_exported(prefix, epoch, ctx)
    num_classes = _probe(net, data_shape, ctx[0])
    total = data.count_records(shards)
    val = data.val_iter(shards, batch_size, data_shape, crop_pct=crop_pct, mean=tuple(mean), std=tuple(std),
                        preprocess_threads=preprocess_threads)
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
        "protocol": {"resize_shorter": data.val_resize(min(data_shape[1:]), crop_pct), "crop": list(data_shape[1:]),
                     "crop_pct": crop_pct, "interpolation": "bilinear", "channel_order": "RGB",
                     "mean": list(mean), "std": list(std), "each_image_once": True},
        "num_classes": num_classes,
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
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted"] + names)
        for i, row in enumerate(confusion):
            writer.writerow([names[i]] + [int(v) for v in row])


def benchmark(prefix: str, epoch: int, ctx: list[mx.Context], batch_sizes: list[int],
              data_shape: tuple[int, int, int], warmup: int = 3, repeats: int = 10) -> list[dict]:
    """Images/s and ms/batch on synthetic input for each batch size (synchronised with ``wait_to_read``)."""
    net = load_exported(prefix, epoch, ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    _probe(net, data_shape, ctx[0])
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


def _load_image(path: str, data_shape, crop_pct: float, mean, std) -> mx.nd.NDArray:
    """The validation protocol on one file: shorter side to floor(size / crop_pct), centre crop, normalise."""
    if not os.path.isfile(path):
        raise ScoreError(f"image {path} not found")
    with open(path, "rb") as f:
        buf = f.read()
    try:
        img = mx.image.imdecode(buf, flag=1, to_rgb=True)  # HWC uint8 RGB
    except mx.base.MXNetError:
        raise ScoreError(f"{path} is not a readable image") from None
    size_h, size_w = data_shape[1], data_shape[2]
    img = mx.image.resize_short(img, data.val_resize(min(size_h, size_w), crop_pct), interp=1)
    img, _ = mx.image.center_crop(img, (size_w, size_h))
    img = (img.astype("float32") - mx.nd.array(mean)) / mx.nd.array(std)
    return img.transpose((2, 0, 1)).expand_dims(0)


def predict(prefix: str, epoch: int, images: list[str], ctx: mx.Context, data_shape, crop_pct: float, mean, std,
            classes: str | None = None, top_k: int = 5) -> list[dict]:
    """Each image's top-k classes with softmax probabilities, under the validation protocol."""
    net = load_exported(prefix, epoch, [ctx])
    num_classes = _probe(net, data_shape, ctx)
    names = read_classes(classes, num_classes)
    results = []
    for path in images:
        x = _load_image(path, data_shape, crop_pct, mean, std).as_in_context(ctx)
        probs = mx.nd.softmax(net(x)).asnumpy()[0]
        order = np.argsort(-probs)[:min(top_k, num_classes)]
        results.append({"image": path, "top": [{"class": int(c), "name": names[c], "prob": float(probs[c])}
                                               for c in order]})
    return results
