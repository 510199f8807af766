"""im2rec_tools command line: make-list, pack, verify, demo-digits, and one-line errors for bad input."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter

import cv2
import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from im2rec_tools import packing
from im2rec_tools.__main__ import main
from im2rec_tools.listing import read_classes, read_lst
from shard_factory import write_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_SAMPLE = os.path.join(REPO, "..", "shared", "data", "imagenet-sample")


def run(capsys, *argv):
    """(exit code, stdout, stderr) of the command line run in-process."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_shard(rec_path):
    """[(header, decoded BGR-or-whatever image)] of one shard, in .idx order."""
    reader = mx.recordio.MXIndexedRecordIO(rec_path[:-4] + ".idx", rec_path, "r")
    records = [mx.recordio.unpack_img(reader.read_idx(k), cv2.IMREAD_UNCHANGED) for k in reader.keys]
    reader.close()
    return records


def shard_files(prefix, count):
    return [f"{prefix}-{i:05d}-of-{count:05d}.{ext}" for i in range(count) for ext in ("rec", "idx")]


# ------------------------------------------------------------------------------------------------- make-list

def test_make_list_walks_class_folders_and_splits_per_class(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_tree(str(root), ["b_cls", "a_cls"], per_class=10)
    os.makedirs(root / "a_cls" / "deep" / "er")
    cv2.imwrite(str(root / "a_cls" / "deep" / "er" / "X.JPEG"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(root / "b_cls" / "Y.Png"), np.zeros((8, 8, 3), np.uint8))
    (root / "b_cls" / "notes.txt").write_text("not an image")
    code, out, _ = run(capsys, "make-list", root, tmp_path / "out" / "ds", "--val-ratio", "0.3", "--seed", "4")
    assert code == 0 and "ds_train.lst" in out
    assert read_classes(str(tmp_path / "out" / "ds_classes.txt")) == ["a_cls", "b_cls"]
    train = read_lst(str(tmp_path / "out" / "ds_train.lst"))
    val = read_lst(str(tmp_path / "out" / "ds_val.lst"))
    assert Counter(e.label for e in val) == {0: 3, 1: 3}  # round(11 * 0.3) per class
    everything = {e.path: e.label for e in train + val}
    assert len(everything) == 22 and "a_cls/deep/er/X.JPEG" in everything and "b_cls/Y.Png" in everything
    assert all(p.startswith(("a_cls", "b_cls")[label]) for p, label in everything.items())
    assert len({e.index for e in train + val}) == 22
    labels = [e.label for e in train]
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)  # classes mixed for shards/parts
    # deterministic for a seed, different for another
    run(capsys, "make-list", root, tmp_path / "again", "--val-ratio", "0.3", "--seed", "4")
    assert (tmp_path / "again_train.lst").read_text() == (tmp_path / "out" / "ds_train.lst").read_text()
    run(capsys, "make-list", root, tmp_path / "other", "--val-ratio", "0.3", "--seed", "5")
    assert {e.path for e in read_lst(str(tmp_path / "other_val.lst"))} != {e.path for e in val}
    # --val-ratio 0: one list with every image
    code, out, _ = run(capsys, "make-list", root, tmp_path / "one", "--val-ratio", "0")
    assert code == 0 and len(read_lst(str(tmp_path / "one.lst"))) == 22 and not (tmp_path / "one_val.lst").exists()


def test_make_list_flat_folder_with_csv_and_train_classes(tmp_path, capsys):
    tree = tmp_path / "train"
    write_tree(str(tree), ["n01", "n02", "n03"], per_class=2)
    run(capsys, "make-list", tree, tmp_path / "train", "--val-ratio", "0")
    flat = tmp_path / "val"
    flat.mkdir()
    rows = ["ImageId,Label"]
    for i, wnid in enumerate(["n03", "n01", "n03"]):
        cv2.imwrite(str(flat / f"VAL_{i}.JPEG"), np.full((8, 8, 3), 50, np.uint8))
        rows.append(f"VAL_{i}.JPEG,{wnid}")
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    code, _, err = run(capsys, "make-list", flat, tmp_path / "val", "--val-ratio", "0", "--labels",
                       tmp_path / "val.csv", "--classes", tmp_path / "train_classes.txt")
    assert code == 0, err
    assert {e.path: e.label for e in read_lst(str(tmp_path / "val.lst"))} == {
        "VAL_0.JPEG": 2, "VAL_1.JPEG": 0, "VAL_2.JPEG": 2}


# ------------------------------------------------------------------------------------------------------ pack

def _odd_inputs(root):
    """Files that must pack as 3-channel images, and files that must be skipped."""
    os.makedirs(root / "c")
    grey = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (20, 1))
    cv2.imwrite(str(root / "c" / "grey.jpg"), grey)
    Image.new("CMYK", (24, 20), (0, 255, 255, 0)).save(root / "c" / "cmyk.jpg", quality=95)  # red
    rgba = np.zeros((20, 24, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255  # opaque blue
    rgba[:, :12, 3] = 0  # left half transparent
    cv2.imwrite(str(root / "c" / "rgba.png"), rgba)
    cv2.imwrite(str(root / "c" / "png_named.png"), np.full((20, 24, 3), (0, 200, 0), np.uint8))
    os.rename(root / "c" / "png_named.png", root / "c" / "really_png.jpg")
    cv2.imwrite(str(root / "c" / "deep16.png"), np.full((20, 24), 40000, np.uint16))
    good = open(cv2.imwrite(str(root / "c" / "whole.jpg"), np.full((20, 24, 3), 99, np.uint8)) and
                root / "c" / "whole.jpg", "rb").read()
    (root / "c" / "truncated.jpg").write_bytes(good[:len(good) // 2])
    (root / "c" / "text.jpg").write_text("this is not an image\n")


def test_pack_converts_odd_images_and_skips_unreadable_ones(tmp_path, capsys):
    root = tmp_path / "imgs"
    _odd_inputs(root)
    run(capsys, "make-list", root, tmp_path / "odd", "--val-ratio", "0")
    code, out, err = run(capsys, "pack", tmp_path / "odd.lst", tmp_path / "odd", "--image-root", root,
                         "--workers", "2")
    assert code == 0, err
    assert "skipped 2 unreadable files" in out
    skipped = (tmp_path / "odd-skipped.txt").read_text()
    assert "c/truncated.jpg" in skipped and "c/text.jpg" in skipped and "cannot decode" in skipped
    paths = {e.index: e.path for e in read_lst(str(tmp_path / "odd.lst"))}
    images = {os.path.basename(paths[h.id]): img for h, img in read_shard(str(tmp_path / "odd-00000-of-00001.rec"))}
    assert sorted(images) == ["cmyk.jpg", "deep16.png", "grey.jpg", "really_png.jpg", "rgba.png", "whole.jpg"]
    assert all(img.ndim == 3 and img.shape[2] == 3 for img in images.values())
    assert np.allclose(images["cmyk.jpg"][10, 12], (0, 0, 255), atol=12)  # red, BGR
    assert np.allclose(images["really_png.jpg"][10, 12], (0, 200, 0), atol=6)
    assert np.allclose(images["rgba.png"][10, 20], (255, 0, 0), atol=6)  # opaque part
    assert np.allclose(images["rgba.png"][10, 3], (255, 255, 255), atol=6)  # transparent part: white
    grey = images["grey.jpg"].astype(int)
    assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 3 and grey[..., 0].max() - grey[..., 0].min() > 150
    assert np.allclose(images["deep16.png"][5, 5], 40000 >> 8, atol=3)


def test_pack_spreads_shards_evenly_and_shrinks_but_never_upscales(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_tree(str(root), ["a", "b"], per_class=5, size=40)
    cv2.imwrite(str(root / "a" / "big.jpg"), np.full((120, 90, 3), 128, np.uint8))
    run(capsys, "make-list", root, tmp_path / "l", "--val-ratio", "0")
    code, out, _ = run(capsys, "pack", tmp_path / "l.lst", tmp_path / "s" / "p", "--image-root", root, "--shards",
                       "4", "--resize", "60", "--quality", "90", "--workers", "1")
    assert code == 0 and "skipped 0" in out
    sizes = [len(read_shard(str(tmp_path / "s" / f"p-{i:05d}-of-00004.rec"))) for i in range(4)]
    assert sorted(sizes) == [2, 3, 3, 3]
    shapes = {img.shape for i in range(4) for _, img in read_shard(str(tmp_path / "s" / f"p-{i:05d}-of-00004.rec"))}
    assert shapes == {(40, 40, 3), (80, 60, 3)}  # 40 px kept, 120x90 shrunk to shorter side 60


def test_rerun_rebuilds_only_the_missing_shard(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_tree(str(root), ["a", "b"], per_class=6)
    run(capsys, "make-list", root, tmp_path / "l", "--val-ratio", "0")
    args = ("pack", tmp_path / "l.lst", tmp_path / "p", "--image-root", root, "--shards", "3", "--workers", "1")
    assert run(capsys, *args)[0] == 0
    files = shard_files(str(tmp_path / "p"), 3)
    before = {f: (os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files}
    original = open(files[2], "rb").read()
    os.remove(files[2])  # shard 1's .rec
    code, out, _ = run(capsys, *args)
    assert code == 0 and "1 built, 2 left alone" in out
    after = {f: (os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files}
    assert [f for f in files if after[f] != before[f]] == files[2:4]
    assert open(files[2], "rb").read() == original
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_interrupted_pack_leaves_no_partial_shard_and_rerun_finishes(tmp_path, capsys, monkeypatch):
    root = tmp_path / "imgs"
    write_tree(str(root), ["a", "b"], per_class=6)
    run(capsys, "make-list", root, tmp_path / "l", "--val-ratio", "0")
    args = ("pack", tmp_path / "l.lst", tmp_path / "p", "--image-root", root, "--shards", "3", "--workers", "1")
    real, calls = packing._encode_task, []

    def interrupt_in_second_shard(task):
        calls.append(task)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(packing, "_encode_task", interrupt_in_second_shard)
    code, _, err = run(capsys, *args)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("python -m im2rec_tools pack: interrupted;")  # after the bar
    present = sorted(os.listdir(tmp_path))
    assert "p-00000-of-00003.idx" in present and "p-00001-of-00003.rec" not in present
    assert not [n for n in present if n.endswith(".tmp")]
    monkeypatch.setattr(packing, "_encode_task", real)
    code, out, _ = run(capsys, *args)
    assert code == 0 and "2 built, 1 left alone" in out
    assert run(capsys, "verify", tmp_path / "p", "--decode")[0] == 0


# ---------------------------------------------------------------------------------------------------- verify

@pytest.fixture
def good_shards(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_tree(str(root), ["a", "b", "c"], per_class=4)
    run(capsys, "make-list", root, tmp_path / "l", "--val-ratio", "0")
    run(capsys, "pack", tmp_path / "l.lst", tmp_path / "v", "--image-root", root, "--shards", "2", "--workers", "1")
    return str(tmp_path / "v")


def test_verify_accepts_good_shards(good_shards, capsys):
    code, out, _ = run(capsys, "verify", good_shards, "--decode")
    assert code == 0 and out.rstrip().endswith("OK")
    assert "total: 12 good records in 2 shards" in out and "min 4 (label 0), max 4" in out
    assert "height 32, width 32" in out


def _record_offsets(rec_path):
    with open(rec_path[:-4] + ".idx") as f:
        return sorted(int(line.split("\t")[1]) for line in f if line.strip())


def test_verify_reports_a_corrupted_image(good_shards, capsys):
    rec = good_shards + "-00001-of-00002.rec"
    offsets = _record_offsets(rec)
    with open(rec, "r+b") as f:  # overwrite the JPEG data of record 2 (after its 8-byte frame and 24-byte header)
        f.seek(offsets[2] + 8 + 24)
        f.write(b"\x00" * 64)
    code, out, _ = run(capsys, "verify", good_shards, "--decode")
    assert code == 1 and "v-00001-of-00002.rec index 2" in out and "does not decode" in out
    assert out.rstrip().endswith("FAILED: 1 bad records, 0 missing files")


def test_verify_reports_a_broken_record_header(good_shards, capsys):
    rec = good_shards + "-00000-of-00002.rec"
    offsets = _record_offsets(rec)
    with open(rec, "r+b") as f:
        f.seek(offsets[4])
        f.write(b"JUNK")
    code, out, _ = run(capsys, "verify", rec)
    assert code == 1 and "index 4" in out and "no record starts at byte" in out


def test_verify_reports_missing_idx_and_missing_shard(good_shards, capsys):
    os.remove(good_shards + "-00001-of-00002.idx")
    code, out, _ = run(capsys, "verify", good_shards)
    assert code == 1 and "has no index v-00001-of-00002.idx" in out
    os.remove(good_shards + "-00001-of-00002.rec")
    code, out, _ = run(capsys, "verify", good_shards + "-*.rec")
    assert code == 1 and "v-00001-of-00002.rec is missing" in out


# ----------------------------------------------------------------------------------------------- demo-digits

def test_demo_digits_all_classes_and_relabelled_subset(tmp_path, capsys):
    out_dir = tmp_path / "digits"
    code, out, _ = run(capsys, "demo-digits", out_dir, "--size", "32", "--shards", "3")
    assert code == 0 and "train-00000-of-00003.rec" in out
    code, report, _ = run(capsys, "verify", out_dir / "train", "--decode")
    assert code == 0 and "labels 0..9" in report and "height 32, width 32" in report
    train = read_lst(str(out_dir / "train.lst"))
    val = read_lst(str(out_dir / "val.lst"))
    assert len(train) + len(val) == 1797 and abs(len(val) / 1797 - 0.2) < 0.01
    assert read_classes(str(out_dir / "classes.txt")) == [str(d) for d in range(10)]
    # rerun with a subset and fewer shards: relabelled 0..K-1 in the given order, nothing stale left behind
    code, out, _ = run(capsys, "demo-digits", out_dir, "--size", "32", "--digits", "7,5,9", "--shards", "2")
    assert code == 0
    assert read_classes(str(out_dir / "classes.txt")) == ["7", "5", "9"]
    assert sorted(n for n in os.listdir(out_dir) if n.endswith(".rec")) == [
        "train-00000-of-00002.rec", "train-00001-of-00002.rec", "val-00000-of-00002.rec", "val-00001-of-00002.rec"]
    assert sorted(n for n in os.listdir(out_dir / "images") if not n.startswith(".")) == ["5", "7", "9"]
    entries = read_lst(str(out_dir / "train.lst")) + read_lst(str(out_dir / "val.lst"))
    assert {(e.path.split("/")[0], e.label) for e in entries} == {("7", 0), ("5", 1), ("9", 2)}
    labels = Counter(h.label for i in range(2) for h, _ in read_shard(str(out_dir / f"val-{i:05d}-of-00002.rec")))
    assert sorted(labels) == [0, 1, 2]
    assert run(capsys, "verify", out_dir / "val", "--decode")[0] == 0


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("argv, needle", [
    ([], "choose a command"),
    (["shuffle"], "invalid choice"),
    (["make-list", "{tmp}/absent", "{tmp}/out"], "does not exist"),
    (["make-list", "{tmp}/empty", "{tmp}/out"], "is empty"),
    (["make-list", "{tmp}/empty", "{tmp}/out", "--val-ratio", "1.5"], "--val-ratio"),
    (["make-list", "{tmp}/empty", "{tmp}/out", "--labels", "{tmp}/absent.csv"], "labels file"),
    (["pack", "{tmp}/absent.lst", "{tmp}/p", "--image-root", "{tmp}"], "image list"),
    (["pack", "{tmp}/a.lst", "{tmp}/p"], "--image-root"),
    (["pack", "{tmp}/a.lst", "{tmp}/p", "--image-root", "{tmp}", "--shards", "0"], "--shards"),
    (["pack", "{tmp}/a.lst", "{tmp}/p", "--image-root", "{tmp}/absent"], "does not exist"),
    (["pack", "{tmp}/a.lst", "{tmp}/p", "--image-root", "{tmp}/empty"], "wrong --image-root"),
    (["pack", "{tmp}/a.lst", "{tmp}/p", "--image-root", "{tmp}", "--shards", "5"], "more than the 1 images"),
    (["pack", "{tmp}/bad.lst", "{tmp}/p", "--image-root", "{tmp}"], "bad.lst line 1"),
    (["pack", "{tmp}/a.lst", "{tmp}/", "--image-root", "{tmp}"], "ends with a folder separator"),
    (["verify", "{tmp}/nothing"], "no shards for prefix"),
    (["verify", "{tmp}/nothing-*.rec"], "no .rec files match"),
    (["demo-digits", "{tmp}/d", "--digits", "1,1"], "--digits"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, capsys, argv, needle):
    (tmp_path / "empty").mkdir()
    cv2.imwrite(str(tmp_path / "x.jpg"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "a.lst").write_text("0\t0.000000\tx.jpg\n")
    (tmp_path / "bad.lst").write_text("0\tcat\tx.jpg\n")
    before = sorted(os.listdir(tmp_path))
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "im2rec_tools", "verify", str(tmp_path / "none")],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"python -m im2rec_tools verify: error: no shards for prefix {str(tmp_path / 'none')!r}: looked for "
        f"{tmp_path / 'none'}-NNNNN-of-NNNNN.rec and {tmp_path / 'none'}.rec"]


# --------------------------------------------------------------------------------------- real ImageNet files

@pytest.mark.skipif(not os.path.isdir(IMAGENET_SAMPLE), reason="../shared/data/imagenet-sample is not present")
def test_imagenet_sample_packs_and_reads_back(tmp_path, capsys):
    names = sorted(os.listdir(IMAGENET_SAMPLE))
    greys = [n for n in names if cv2.imread(os.path.join(IMAGENET_SAMPLE, n), cv2.IMREAD_UNCHANGED).ndim == 2][:3]
    chosen = greys + [n for n in names if n not in greys][:9]
    root = tmp_path / "in"
    for n in chosen:
        os.makedirs(root / n.split("_")[0], exist_ok=True)
        shutil.copy(os.path.join(IMAGENET_SAMPLE, n), root / n.split("_")[0] / n)
    run(capsys, "make-list", root, tmp_path / "s", "--val-ratio", "0")
    code, out, _ = run(capsys, "pack", tmp_path / "s.lst", tmp_path / "s", "--image-root", root, "--resize", "96",
                       "--shards", "2", "--workers", "2")
    assert code == 0 and "skipped 0" in out
    code, report, _ = run(capsys, "verify", tmp_path / "s", "--decode")
    assert code == 0 and "total: 12 good records" in report
    from xception_mx import data

    batch = next(iter(data.val_iter(str(tmp_path / "s"), 12, (3, 64, 64), preprocess_threads=2)))
    assert batch.data[0].shape == (12, 3, 64, 64) and batch.pad == 0
    assert sorted(batch.label[0].asnumpy().astype(int).tolist()) == sorted(
        sorted({n.split("_")[0] for n in chosen}).index(n.split("_")[0]) for n in chosen)
