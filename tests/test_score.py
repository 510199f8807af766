"""score.py: exact agreement with the trainer, hand-computed metrics, predict, benchmark, one-line errors."""
import csv
import json
import os

import cv2
import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from helpers import TINY_FILTERS, score_cli
from xception_mx.metrics import read_jsonl
from xception_mx.plan import plan_run
from xception_mx.train import Trainer

COLOURS = np.array([(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 230, 230), (200, 200, 30), (30, 200, 200)],
                   dtype=np.float32)


def nearest_colour_export(prefix):
    """A net whose logits are -|mean colour - colour_k|^2 (up to a constant): it predicts the nearest colour."""
    centres = (COLOURS - 127.5) / 127.5
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(3, 3, strides=2, in_channels=3, use_bias=False), gluon.nn.GlobalAvgPool2D(),
            gluon.nn.Flatten(), gluon.nn.Dense(6, in_units=3))
    net.initialize()
    identity = np.zeros((3, 3, 3, 3), np.float32)
    for c in range(3):
        identity[c, c] = 1.0 / 9
    net[0].weight.set_data(identity)  # a 3x3 box filter per channel: keeps the mean colour
    net[3].weight.set_data(2 * centres)
    net[3].bias.set_data(-(centres ** 2).sum(axis=1))
    net.hybridize()
    net(mx.nd.zeros((1, 3, 72, 72)))
    net.export(prefix, epoch=3)
    return centres


def write_flat_shard(folder, name, items, size=80):
    """items: (colour index, label) pairs -> a shard of flat-colour JPEGs (and the same images as files)."""
    base = os.path.join(folder, f"{name}-00000-of-00001")
    writer = mx.recordio.MXIndexedRecordIO(base + ".idx", base + ".rec", "w")
    files = []
    for i, (colour, label) in enumerate(items):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = COLOURS[colour].astype(np.uint8)[::-1]  # BGR
        writer.write_idx(i, mx.recordio.pack_img(mx.recordio.IRHeader(0, float(label), i, 0), img, quality=95))
        path = os.path.join(folder, f"{name}_{i}.png")
        cv2.imwrite(path, img)
        files.append(path)
    writer.close()
    return files


def test_metrics_and_confusion_match_a_hand_computation(tmp_path):
    prefix = str(tmp_path / "nearest")
    centres = nearest_colour_export(prefix)
    # 13 images (not a multiple of the batch of 4); labels chosen so that some are wrong.
    items = [(0, 0), (0, 0), (1, 1), (1, 2), (2, 2), (3, 3), (3, 0), (4, 4), (4, 5), (5, 5), (5, 1), (2, 2), (0, 3)]
    write_flat_shard(str(tmp_path), "val", items)
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{i}\tcolour_{i}\n" for i in range(6)))
    report = tmp_path / "report.json"
    result = score_cli("--model-prefix", prefix, "--epoch", 3, "--rec", tmp_path / "val", "--batch-size", 4,
                       "--data-shape", "3,72,72", "--crop-pct", "0.9", "--json", report, "--per-class",
                       "--classes", classes)
    assert result.returncode == 0, result.stderr
    got = json.loads(report.read_text())
    # Hand computation: the prediction is the image's colour; top-5 misses only the farthest colour.
    farthest = [int(np.argmax(((centres - centres[c]) ** 2).sum(axis=1))) for c in range(6)]
    top1 = sum(c == l for c, l in items) / len(items)
    top5 = sum(l != farthest[c] for c, l in items) / len(items)
    confusion = np.zeros((6, 6), int)
    for c, l in items:
        confusion[l, c] += 1
    assert got["images"] == len(items)
    assert got["top1"] == pytest.approx(top1, abs=1e-12)
    assert got["top5"] == pytest.approx(top5, abs=1e-12)
    assert got["protocol"]["resize_shorter"] == 80 and got["protocol"]["crop"] == [72, 72]
    with open(got["confusion_csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == [f"colour_{i}" for i in range(6)]
    np.testing.assert_array_equal(np.array([[int(v) for v in r[1:]] for r in rows[1:]]), confusion)
    per_class = {r["class"]: r for r in got["per_class"]}
    assert per_class[0]["top1"] == pytest.approx(2 / 3) and per_class[0]["name"] == "colour_0"
    assert "top-1 0.6154" in result.stdout  # 8 of 13


def test_predict_agrees_with_score(tmp_path):
    prefix = str(tmp_path / "nearest")
    nearest_colour_export(prefix)
    files = write_flat_shard(str(tmp_path), "one", [(4, 4)])
    scored = score_cli("--model-prefix", prefix, "--epoch", 3, "--rec", tmp_path / "one", "--data-shape",
                       "3,72,72", "--json", tmp_path / "s.json", "--per-class")
    assert scored.returncode == 0, scored.stderr
    confusion = json.loads((tmp_path / "s.json").read_text())["per_class"]
    scored_class = [r["class"] for r in confusion if r["images"]][0]
    predicted = score_cli("predict", "--model-prefix", prefix, "--epoch", 3, "--data-shape", "3,72,72",
                          "--top-k", 3, "--json", tmp_path / "p.json", files[0])
    assert predicted.returncode == 0, predicted.stderr
    top = json.loads((tmp_path / "p.json").read_text())[0]["top"]
    assert len(top) == 3 and top[0]["class"] == 4 == scored_class
    assert top[0]["prob"] > top[1]["prob"] > top[2]["prob"]


@pytest.mark.slow
def test_scoring_a_trained_export_reproduces_the_trainers_validation(colour_shards, tmp_path):
    out = tmp_path / "run"
    Trainer(plan_run(["--train-rec", str(colour_shards / "train"), "--val-rec", str(colour_shards / "val"),
                        "--num-classes", "4", "--model", "xception_slim", "--filter-list",
                        ",".join(map(str, TINY_FILTERS)), "--input-size", "72", "--batch-size", "16",
                        "--num-epochs", "2", "--lr", "0.1", "--lr-mode", "cosine", "--min-area", "0.5",
                        "--ema", "0.5", "--output-dir", str(out), "--preprocess-threads", "2"])).fit()
    logged = read_jsonl(str(out / "metrics.jsonl"))
    for epoch in (1, 2):
        # No preprocessing flags: score.py takes them from the protocol written beside the export.
        result = score_cli("--model-prefix", out / "xception_slim", "--epoch", epoch, "--rec",
                           colour_shards / "val", "--batch-size", 16, "--json", tmp_path / f"e{epoch}.json")
        assert result.returncode == 0, result.stderr
        got = json.loads((tmp_path / f"e{epoch}.json").read_text())
        assert got["images"] == 22  # each image once: 16 + 6, the padding of the last batch dropped
        assert got["top1"] == logged[epoch - 1]["val_top1"]
        assert got["top5"] == logged[epoch - 1]["val_top5"]
        assert got["cross_entropy"] == pytest.approx(logged[epoch - 1]["val_loss"], rel=1e-4)


def test_benchmark_prints_a_row_per_batch_size(tmp_path):
    prefix = str(tmp_path / "nearest")
    nearest_colour_export(prefix)
    result = score_cli("--model-prefix", prefix, "--epoch", 3, "--benchmark", "--batch-size", "1,4",
                       "--data-shape", "3,72,72", "--warmup", 1, "--repeats", 2, "--json", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["benchmark"]
    assert [r["batch_size"] for r in rows] == [1, 4]
    assert all(r["images_per_sec"] > 0 for r in rows)
    assert "| 4 |" in result.stdout


@pytest.mark.parametrize("case, fragment", [
    ("missing_symbol", "symbol.json not found"),
    ("missing_params", "epochs that exist for"),
    ("mismatched_params", "does not match"),
    ("missing_idx", ".idx"),
    ("small_shape", "at least 71x71"),
    ("wrong_channels", "does not fit the model"),
    ("labels_beyond_classes", "outside 0..5"),
    ("missing_image", "not found"),
    ("empty_shards", "the shards hold no records ("),
])
def test_bad_input_is_one_clear_line(case, fragment, tmp_path):
    prefix = str(tmp_path / "nearest")
    nearest_colour_export(prefix)
    write_flat_shard(str(tmp_path), "val", [(0, 0), (1, 1)])
    args = ["--model-prefix", prefix, "--epoch", 3, "--rec", tmp_path / "val", "--data-shape", "3,72,72"]
    if case == "missing_symbol":
        args[1] = str(tmp_path / "other")
    elif case == "missing_params":
        args[3] = 7
    elif case == "mismatched_params":
        other = gluon.nn.Dense(2, in_units=3)
        other.initialize()
        other.hybridize()
        other(mx.nd.zeros((1, 3)))
        other.export(str(tmp_path / "dense"), epoch=3)
        os.replace(str(tmp_path / "dense-0003.params"), prefix + "-0003.params")
    elif case == "missing_idx":
        os.remove(tmp_path / "val-00000-of-00001.idx")
    elif case == "small_shape":
        args[-1] = "3,64,64"
    elif case == "wrong_channels":
        args[-1] = "1,72,72"
    elif case == "labels_beyond_classes":
        write_flat_shard(str(tmp_path), "val", [(0, 0), (1, 9)])
    elif case == "empty_shards":
        for ext in ("rec", "idx"):
            (tmp_path / f"val-00000-of-00001.{ext}").write_bytes(b"")
    elif case == "missing_image":
        args = ["predict", "--model-prefix", prefix, "--epoch", 3, "--data-shape", "3,72,72", tmp_path / "no.jpg"]
    result = score_cli(*args)
    assert result.returncode != 0
    lines = [l for l in result.stderr.strip().splitlines() if l.strip() and not l.startswith("[")]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    if case in ("labels_beyond_classes", "empty_shards"):  # the shard is named
        assert "val-00000-of-00001.rec" in lines[0], lines[0]
