"""Fault injection, the data: undecodable images, corrupt shards found by verify and at start, bad labels, an empty
validation set, a symlink loop and non-UTF-8 names in an image tree; each checking the exit code, the one-line
message and that nothing is written on the strength of bad input."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, base_args, one_line, train_cli

pytestmark = [pytest.mark.faults, pytest.mark.slow]


# 2 -------------------------------------------------------------------------------------------------------------
def _damage_image(shard_rec, index, how):
    """Rewrite one record's image bytes in place (same length: the .idx stays valid): ``not_image`` replaces them
    all, ``cut_jpeg`` zeroes everything from the JPEG's start-of-scan marker on (a file cut off before its data)."""
    offsets = sorted(int(line.split("\t")[1]) for line in open(shard_rec[:-4] + ".idx") if line.strip())
    with open(shard_rec, "r+b") as f:
        f.seek(offsets[index])
        _, lrec = np.frombuffer(f.read(8), "<u4")
        image_at, image_len = offsets[index] + 8 + 24, (int(lrec) & ((1 << 29) - 1)) - 24
        f.seek(image_at)
        image = f.read(image_len)
        if how == "not_image":
            new = (b"not a jpeg " * image_len)[:image_len]
        elif how == "cut_jpeg":
            new = image[:image.index(b"\xff\xda")] + b"\0" * (image_len - image.index(b"\xff\xda"))
        else:  # cut_in_scan: the second half of the compressed data gone (a download cut short); decodes, warned
            new = image[:image_len // 2] + b"\0" * (image_len - image_len // 2)
        f.seek(image_at)
        f.write(new)


@pytest.mark.parametrize("where, how, fragment", [
    ("val", "not_image", "holds no decodable image"),  # MXNet died with SIGFPE at validation, after an epoch
    ("train", "cut_jpeg", "holds a JPEG"),  # a valid header and no image data: SIGFPE too
    ("train", "cut_in_scan", "is a JPEG cut off before its end"),  # trained on silently before
])
def test_an_undecodable_image_stops_the_run_at_start_with_one_line(colour_shards, tmp_path, where, how, fragment):
    shards = tmp_path / "shards"
    shutil.copytree(colour_shards, shards)
    rec = str(shards / ("val-00000-of-00001.rec" if where == "val" else "train-00001-of-00002.rec"))
    _damage_image(rec, 3, how)
    out = tmp_path / "run"
    args = base_args(shards, out, "--num-epochs", "1")
    args[args.index("--train-rec") + 1] = str(shards / "train")
    args[args.index("--val-rec") + 1] = str(shards / "val")
    result = train_cli(args)
    assert result.returncode == 2
    line = one_line(result)
    assert f"{rec}: record 3 (byte" in line and fragment in line
    assert not (out / "metrics.jsonl").exists()  # found before any training
    scored = subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), "--model-prefix", str(tmp_path / "m"),
                             "--epoch", "1", "--rec", rec], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert scored.returncode == 2 and "record 3 (byte" in one_line(scored)


# 3 -------------------------------------------------------------------------------------------------------------
def _packed(tmp_path, name="packed"):
    """Shards made by im2rec-tools pack (so they have .crc checksums) from 40 noisy 96 px JPEGs."""
    import cv2

    images = tmp_path / f"{name}_images"
    rng = np.random.RandomState(0)
    for c in range(2):
        (images / f"class{c}").mkdir(parents=True)
        for i in range(20):
            img = np.clip(rng.normal(100 + 60 * c, 40, (96, 96, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(images / f"class{c}" / f"{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    im2rec = [sys.executable, "-m", "im2rec_tools"]
    prefix = tmp_path / name / "ds"
    subprocess.run([*im2rec, "make-list", str(images), str(prefix), "--val-ratio", "0.2"], check=True, cwd=ROOT,
                   capture_output=True)
    subprocess.run([*im2rec, "pack", str(prefix) + "_train.lst", str(tmp_path / name / "train"), "--image-root",
                    str(images), "--shards", "2"], check=True, cwd=ROOT, capture_output=True)
    return tmp_path / name


def verify(*args):
    return subprocess.run([sys.executable, "-m", "im2rec_tools", "verify", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("damage", ["zeroed", "bit_flip", "truncated", "foreign_idx", "cut_at_60pct", "empty_rec",
                                    "empty_crc", "garbage_crc", "cut_crc", "cut_idx"])
def test_verify_finds_every_corruption_with_shard_and_record(tmp_path, damage):
    folder = _packed(tmp_path)
    rec = folder / "train-00001-of-00002.rec"
    assert verify(folder / "train").returncode == 0
    offsets = sorted(int(line.split("\t")[1]) for line in open(str(rec)[:-4] + ".idx") if line.strip())
    index = 5
    if damage == "zeroed":  # inside the JPEG payload: libjpeg only warns, verify without checksums saw nothing
        with open(rec, "r+b") as f:
            f.seek(offsets[index] + 8 + 24 + 600)
            f.write(b"\0" * 1500)
    elif damage == "bit_flip":
        with open(rec, "r+b") as f:
            f.seek(offsets[index] + 8 + 24 + 900)
            byte = f.read(1)[0]
            f.seek(-1, 1)
            f.write(bytes([byte ^ 0x10]))
    elif damage == "truncated":
        index = len(offsets) - 1
        with open(rec, "r+b") as f:
            f.truncate(offsets[index] + 100)
    elif damage in ("cut_at_60pct", "empty_rec"):  # the .crc kept: its records lie past the end
        index = next(i for i, o in enumerate(offsets) if o > 0.6 * os.path.getsize(rec)) if damage != "empty_rec" else 0
        os.truncate(rec, int(0.6 * os.path.getsize(rec)) if damage != "empty_rec" else 0)
    elif damage in ("empty_crc", "garbage_crc", "cut_crc", "cut_idx"):
        sidecar = Path(str(rec)[:-4] + (".idx" if damage == "cut_idx" else ".crc"))
        body = {"empty_crc": b"", "garbage_crc": bytes(range(256)) * 4}.get(damage, sidecar.read_bytes())
        sidecar.write_bytes(body[:len(body) // 2 - 3] if damage.startswith("cut") else body)
    else:
        shutil.copy(folder / "train-00000-of-00002.idx", str(rec)[:-4] + ".idx")
    result = verify(folder / "train")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD:")]
    assert bad and all("train-00001-of-00002.rec" in line for line in bad), result.stdout
    if damage in ("zeroed", "bit_flip", "truncated", "cut_at_60pct", "empty_rec"):
        assert any(f"index {index} " in line for line in bad), result.stdout
    if damage in ("empty_crc", "garbage_crc", "cut_crc"):
        assert any(".crc" in line for line in bad), result.stdout
    if damage in ("zeroed", "bit_flip"):
        assert any("checksum mismatch" in line for line in bad)
    # The trainer's start-up check names the same shard and record in one line (counts always, CRCs on request).
    if damage in ("zeroed", "bit_flip"):
        check = subprocess.run([sys.executable, "-c", (
            "import sys; from xception_mx.records import check_checksums\n"
            "try:\n    check_checksums(sys.argv[1], verify=True)\n"
            "except Exception as e:\n    print(e)\n"), str(folder / "train")], capture_output=True, text=True,
            cwd=ROOT)
        assert f"index {index} (key" in check.stdout and "checksum mismatch" in check.stdout


def test_verify_decode_counts_a_libjpeg_warning_as_damage_without_checksums(tmp_path):
    folder = _packed(tmp_path)
    rec = folder / "train-00000-of-00002.rec"
    for crc in folder.glob("*.crc"):
        crc.unlink()  # as if packed by MXNet's im2rec.py
    offsets = sorted(int(line.split("\t")[1]) for line in open(str(rec)[:-4] + ".idx") if line.strip())
    with open(rec, "r+b") as f:
        f.seek(offsets[2] + 8 + 24 + 700)
        f.write(b"\0" * 1200)
    plain = verify(folder / "train")
    assert plain.returncode == 0 and "cannot be checksum-verified" in plain.stdout
    decoded = verify(folder / "train", "--decode")
    assert decoded.returncode == 1
    assert "train-00000-of-00002.rec index 2" in decoded.stdout and "libjpeg" in decoded.stdout


# 6 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, fragment", [
    ("label", "num_classes is 2, but"),
    ("empty_val", "the validation shards hold no records:"),
    ("copied_shard", "holds the same records as"),
    ("val_is_train", "is read twice"),
])
def test_bad_labels_and_an_empty_validation_set_are_found_at_start(colour_shards, tmp_path, case, fragment):
    out = tmp_path / "run"
    args = base_args(colour_shards, out, "--num-epochs", "1")
    if case == "label":
        args[args.index("--num-classes") + 1] = "2"
    elif case == "copied_shard":  # a copy under another name, as a careless sync leaves one
        for ext in ("rec", "idx"):
            shutil.copy(colour_shards / f"train-00001-of-00002.{ext}", tmp_path / f"extra.{ext}")
        args[args.index("--train-rec") + 1] = ";".join(
            [str(colour_shards / "train-00000-of-00002.rec"), str(colour_shards / "train-00001-of-00002.rec"),
             str(tmp_path / "extra.rec")])
    elif case == "val_is_train":
        args[args.index("--val-rec") + 1] = str(colour_shards / "train-00001-of-00002.rec")
    else:
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "val.rec").write_bytes(b"")
        (empty / "val.idx").write_bytes(b"")
        args[args.index("--val-rec") + 1] = str(empty / "val")
    result = train_cli(args)
    assert result.returncode == 2
    line = one_line(result)
    assert fragment in line
    if case == "empty_val":
        assert str(empty / "val.rec") in line
    if case == "copied_shard":
        assert str(tmp_path / "extra.rec") in line and "train-00001-of-00002.rec" in line
        listed = verify(f"{colour_shards / 'train-00001-of-00002.rec'};{tmp_path / 'extra.rec'}")
        assert listed.returncode == 1 and "holds the same records as train-00001-of-00002.rec" in listed.stdout
    assert not (out / "metrics.jsonl").exists()


# 8, 9 ----------------------------------------------------------------------------------------------------------
def im2rec(*args):
    return subprocess.run([sys.executable, "-m", "im2rec_tools", *map(str, args)], capture_output=True, cwd=ROOT,
                          timeout=120)


def _one_image_tree(tmp_path):
    import cv2

    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        cv2.imwrite(str(root / c / "x.jpg"), np.full((16, 16, 3), 99, np.uint8))
    return root


def test_a_symlink_loop_in_the_image_tree_is_one_line_and_writes_no_list(tmp_path):
    root = _one_image_tree(tmp_path)
    os.symlink("..", root / "a" / "loop")
    result = im2rec("make-list", root, tmp_path / "lists" / "ds")
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "symbolic link loop" in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "lists").exists() or not list((tmp_path / "lists").glob("*.lst"))


def test_non_utf8_names_and_files_are_one_line(tmp_path):
    root = _one_image_tree(tmp_path)
    bad_name = os.path.join(os.fsencode(str(root / "b")), b"caf\xe9.jpg")
    shutil.copy(str(root / "b" / "x.jpg"), bad_name)
    listed = im2rec("make-list", root, tmp_path / "ds")
    assert listed.returncode == 2
    assert b"caf\\xe9.jpg" in listed.stderr and b"not UTF-8" in listed.stderr and b"Traceback" not in listed.stderr
    os.remove(bad_name)
    lst = tmp_path / "bad.lst"
    lst.write_bytes(b"0\t0\tcaf\xe9.jpg\n")
    packed = im2rec("pack", lst, tmp_path / "out" / "train", "--image-root", root)
    assert packed.returncode == 2 and b"is not UTF-8 text" in packed.stderr and b"Traceback" not in packed.stderr
    config = tmp_path / "c.yaml"
    config.write_bytes(b"lr: 0.1 # caf\xe9\n")
    trained = train_cli(["--config", str(config)])
    assert trained.returncode == 2 and "not UTF-8" in one_line(trained)


def test_list_paths_outside_the_image_root_are_refused_unless_allowed(tmp_path):
    root = _one_image_tree(tmp_path)
    secret = tmp_path / "secret.jpg"  # beside the root, not in it
    shutil.copy(str(root / "a" / "x.jpg"), secret)
    lst = tmp_path / "escape.lst"
    lst.write_text(f"0\t0\ta/x.jpg\n1\t1\t../secret.jpg\n2\t1\t{secret}\n")
    refused = im2rec("pack", lst, tmp_path / "out" / "train", "--image-root", root)
    assert refused.returncode == 2 and b"2 path(s) outside" in refused.stderr and b"../secret.jpg" in refused.stderr
    assert not (tmp_path / "out").exists()
    allowed = im2rec("pack", lst, tmp_path / "out" / "train", "--image-root", root, "--allow-outside-root")
    assert allowed.returncode == 0, allowed.stderr
    labels = tmp_path / "labels.csv"
    labels.write_text("a/x.jpg,a\n../secret.jpg,b\n")
    listed = im2rec("make-list", root, tmp_path / "lists" / "ds", "--labels", labels)
    assert listed.returncode == 2 and b"outside" in listed.stderr and b"Traceback" not in listed.stderr
