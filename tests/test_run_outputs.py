"""What a run leaves for the tools after it: classes.txt kept in the run folder and read by xception-score and
xception-deploy, ``--epoch best|last|N`` and ``--checkpoint`` (one resolving function), the epoch line's lr range and
the lr at each logged step in metrics.jsonl, a loss axis robust to an early outlier, and no MXNet engine banner."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, TINY_FILTERS, one_line, score_cli, train_cli, write_colour_shards
from xception_mx.errors import UserError
from xception_mx.metrics import loss_axis, read_jsonl
from xception_mx.progress import lr_range
from xception_mx.runfolder import resolve_export

NAMES = ["red", "green", "blue", "white"]


# ----------------------------------------------------------------------------------------- pure functions


def _touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"x")


def test_epoch_best_last_number_and_checkpoint_resolve_in_one_place(tmp_path):
    _touch(tmp_path, "m-0001.params", "m-0003.params", "m-0003.state.params", "m-softmax-0009.params")
    (tmp_path / "best.json").write_text(json.dumps({"epoch": 1, "val_top1": 0.5}))
    prefix = str(tmp_path / "m")
    assert resolve_export(prefix, "best", None) == (prefix, 1)
    assert resolve_export(prefix, "last", None) == (prefix, 3)  # not the state file, not another prefix
    assert resolve_export(prefix, "0002", None) == (prefix, 2)
    assert resolve_export(None, None, f"{prefix}-0003.params") == (prefix, 3)


@pytest.mark.parametrize("prefix, epoch, checkpoint, fragment", [
    ("m", "best", None, "no best.json in"),
    ("m", "last", None, "no {tmp}/m-NNNN.params exists: check --model-prefix"),
    ("m", "newest", None, "--epoch must be best, last or a number, got 'newest'"),
    ("m", "bset", None, "got 'bset' (did you mean best?)"),
    ("m", None, None, "needs --epoch: best, last or a number"),
    (None, None, None, "give --model-prefix PREFIX with --epoch best|last|N, or --checkpoint"),
    ("m", "3", "m-0003.params", "give either --checkpoint"),
    (None, None, "m-0003.state.params", "not a state file"),
    (None, None, "m-0004.params", "does not exist"),
])
def test_a_bad_export_choice_is_one_line_naming_what_to_give(tmp_path, prefix, epoch, checkpoint, fragment):
    with pytest.raises(UserError) as caught:
        resolve_export(prefix and str(tmp_path / prefix), epoch, checkpoint and str(tmp_path / checkpoint))
    message = str(caught.value)
    assert fragment.format(tmp=tmp_path) in message and "\n" not in message


def test_best_json_without_an_epoch_says_so(tmp_path):
    (tmp_path / "best.json").write_text("{}")  # what a run writes before its first epoch has a figure
    with pytest.raises(UserError, match="names no epoch yet: give --epoch last or a number"):
        resolve_export(str(tmp_path / "m"), "best", None)


def test_the_loss_axis_leaves_out_an_early_outlier_and_notes_it():
    train = [2.3, 1.9, 1.5, 1.2, 1.0, 0.9]
    val = [121.0, 2.1, 1.6, 1.4, 1.3, 1.25]
    points = [(f"epoch-{e} {k} loss", v) for k, vs in (("train", train), ("val", val)) for e, v in enumerate(vs, 1)]
    (low, high), notes = loss_axis(points)
    assert notes == ["epoch-1 val loss 121 off scale"]
    assert max(train + val[1:]) < high < 10 and 0 < low < min(train + val)


def test_the_loss_axis_keeps_a_long_normal_descent_and_notes_infinite_losses():
    descent = [(f"epoch-{e} train loss", 2.3 * 0.6 ** e) for e in range(10)]  # 2.3 .. 0.023: 100x, no outlier
    (low, high), notes = loss_axis(descent)
    assert notes == [] and low < 0.023 and high > 2.3
    limits, notes = loss_axis([("epoch-1 val loss", math.inf), ("epoch-1 train loss", 2.0)])
    assert notes == ["epoch-1 val loss inf off scale"] and limits[0] < 2.0 < limits[1]
    assert loss_axis([("epoch-1 val loss", float("nan"))]) == (None, [])


def test_the_epoch_lines_lr_is_its_range():
    assert lr_range(0.05, 0.0024) == "0.05->0.0024"
    assert lr_range(0.1, 0.1) == "0.1"
    assert lr_range(0.1, None) == "0.1"


# ------------------------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch run (warm-up then cosine) of the tiny model on shards with a classes.txt beside them."""
    folder = tmp_path_factory.mktemp("outputs")
    data = folder / "data"
    data.mkdir()
    write_colour_shards(data, "train", [32, 32], seed=1)
    write_colour_shards(data, "val", [22], seed=2)
    (data / "classes.txt").write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(NAMES)))
    out = folder / "run"
    result = train_cli(_train_args(data, out))
    assert result.returncode == 0, result.stderr[-2000:]
    return data, out, result


def _train_args(data, out, *extra):
    return ["--train-rec", str(data / "train"), "--val-rec", str(data / "val"), "--model", "xception_slim",
            "--filter-list", ",".join(map(str, TINY_FILTERS)), "--input-size", "72", "--batch-size", "16",
            "--num-epochs", "2", "--lr", "0.05", "--lr-mode", "cosine", "--warmup-epochs", "1",
            "--preprocess-threads", "2", "--output-dir", str(out), "--log-interval", "2", *extra]


@pytest.mark.slow
def test_the_run_prints_no_engine_banner_and_logs_the_engine(run):
    _, _, result = run
    assert "MXNet start using engine" not in result.stderr + result.stdout
    assert "MXNet engine: NaiveEngine (MXNET_ENGINE_TYPE)" in result.stdout


@pytest.mark.slow
def test_the_epoch_line_and_metrics_give_the_lr_over_the_epoch(run):
    _, out, result = run
    assert re.search(r"epoch 1: .* lr 0->0\.05$", result.stdout, re.M), result.stdout
    assert re.search(r"epoch 2: .* lr 0\.05->0$", result.stdout, re.M), result.stdout
    first, second = read_jsonl(str(out / "metrics.jsonl"))
    assert [step[0] for step in first["lr_steps"]] == [1, 2, 4]  # the first step, then every 2nd update
    assert [step[0] for step in second["lr_steps"]] == [5, 6, 8]
    for line in (first, second):  # "lr" is still the epoch's first step
        assert line["lr"] == line["lr_steps"][0][1] and line["lr_last"] == line["lr_steps"][-1][1]
    assert first["lr_steps"][1][1] == pytest.approx(0.05 / 3)  # warm-up, drawn between the epochs' ends
    assert (out / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_curves_draw_old_metrics_and_an_outlier(tmp_path):
    from xception_mx.metrics import plot_curves

    lines = [{"epoch": e, "lr": 0.1, "train_loss": 2.0 / e, "val_loss": 121.0 if e == 1 else 2.0 / e,
              "train_top1": 0.1 * e, "val_top1": 0.1 * e, "val_top5": 0.2 * e} for e in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))  # no lr_steps: old runs
    plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_run_folder_keeps_classes_txt_and_scoring_names_the_classes(run, tmp_path):
    data, out, _ = run
    assert (out / "classes.txt").read_text() == (data / "classes.txt").read_text()
    best = json.loads((out / "best.json").read_text())["epoch"]
    report = tmp_path / "best.json"
    result = score_cli("--model-prefix", out / "xception_slim", "--epoch", "best", "--rec", data / "val",
                       "--per-class", "--json", report, "--confusion-csv", tmp_path / "c.csv")
    assert result.returncode == 0, result.stderr
    assert f"export {out}/xception_slim-{best:04d}.params (--epoch best)" in result.stdout
    scored = json.loads(report.read_text())
    assert scored["epoch"] == best and [row["name"] for row in scored["per_class"]] == NAMES
    image = _png(tmp_path / "pictures" / "a")
    predicted = score_cli("predict", "--checkpoint", out / "xception_slim-0002.params", image)
    assert predicted.returncode == 0, predicted.stderr
    assert re.search(rf"{image}: (red|green|blue|white) 0\.\d+", predicted.stdout), predicted.stdout
    folder = score_cli("predict", "--checkpoint", out / "xception_slim-0002.params", tmp_path / "pictures")
    assert folder.returncode == 0 and re.search(rf"{image}: (red|green|blue|white) 0\.\d+", folder.stdout)
    (tmp_path / "empty").mkdir()
    empty = score_cli("predict", "--checkpoint", out / "xception_slim-0002.params", tmp_path / "empty")
    assert empty.returncode == 2 and one_line(empty).endswith("a folder with no images (.jpg, .jpeg, .png, .bmp) in it")
    last = score_cli("benchmark", "--model-prefix", out / "xception_slim", "--epoch", "last", "--repeats", 1,
                     "--warmup", 0, "--batch-size", 2)
    assert last.returncode == 0 and "xception_slim-0002.params (--epoch last)" in last.stdout


def _png(folder):
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / "red.png")
    cv2.imwrite(path, np.full((80, 80, 3), (40, 40, 220), np.uint8))  # BGR
    return path


@pytest.mark.slow
def test_a_wrong_classes_file_or_a_missing_best_json_is_one_line(run, tmp_path):
    data, out, _ = run
    three = tmp_path / "three.txt"
    three.write_text("0\ta\n1\tb\n2\tc\n")
    wrong = score_cli("--model-prefix", out / "xception_slim", "--epoch", 1, "--rec", data / "val",
                      "--classes", three)
    assert wrong.returncode == 2
    assert one_line(wrong).endswith(f"{three} names 3 classes, the model has 4: give the classes.txt of the data "
                                    f"the model was trained on")
    for name in ("xception_slim-symbol.json", "xception_slim-0001.params"):
        shutil.copy(out / name, tmp_path)
    missing = score_cli("--model-prefix", tmp_path / "xception_slim", "--epoch", "best", "--rec", data / "val")
    assert missing.returncode == 2 and "no best.json in" in one_line(missing)
    assert "give --epoch last or a number" in one_line(missing)


@pytest.mark.slow
def test_a_resumed_run_keeps_its_classes_txt(run, tmp_path):
    data, out, _ = run
    moved_data, resumed = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data, moved_data)
    shutil.copytree(out, resumed)
    (moved_data / "classes.txt").write_text("".join(f"{i}\tother_{i}\n" for i in range(4)))
    result = train_cli(_train_args(moved_data, resumed, "--resume", "--num-epochs", "3"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (resumed / "classes.txt").read_text() == (data / "classes.txt").read_text()


def _deploy(*args):
    return subprocess.run([sys.executable, "-m", "xception_mx.deploy", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_deploy_carries_the_class_names_and_takes_best_and_checkpoint(run, tmp_path):
    import onnx

    _, out, _ = run
    made = _deploy("softmax-head", "--model-prefix", out / "xception_slim", "--epoch", "best", "--out",
                   tmp_path / "head")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "classes.txt").read_text() == (out / "classes.txt").read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "classes.txt").write_text("0\ta\n1\tb\n2\tc\n3\td\n")
    refused = _deploy("softmax-head", "--checkpoint", out / "xception_slim-0002.params", "--out", other / "head")
    assert refused.returncode == 2 and "names other classes than" in one_line(refused)
    assert os.listdir(other) == ["classes.txt"]  # nothing written, the other file untouched
    assert _deploy("onnx", "--checkpoint", out / "xception_slim-0002.params", "--out",
                   tmp_path / "m.onnx").returncode == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["xception_mx.classes"]) == NAMES
