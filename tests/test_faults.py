"""Fault injection: one case per defect of the reliability round (kills, corrupt data, full disks, two trainers,
bad names), each checking the exit code, the one-line message and that what was written before is intact."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, write_colour_shards
from test_train import _cli, base_args, state_params
from xception_mx.metrics import read_jsonl
from xception_mx.runfolder import RunFolder

pytestmark = [pytest.mark.faults, pytest.mark.slow]

PREFIX = "xception_slim"


def one_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def snapshot(folder) -> dict:
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, p)) and p not in ("train.log", ".lock")}


def popen_train(args, **kwargs):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train_xception.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_line(proc, fragment, timeout=180):
    deadline = time.time() + timeout
    for line in proc.stdout:
        if fragment in line:
            return line
        assert time.time() < deadline, f"no line with {fragment!r}"
    raise AssertionError(f"the process ended before printing {fragment!r}")


@pytest.fixture(scope="module")
def finer_shards(tmp_path_factory):
    """64 training images at batch 4: 16 steps an epoch, room for recovery checkpoints inside an epoch."""
    folder = tmp_path_factory.mktemp("finer")
    write_colour_shards(folder, "train", [32, 32], seed=1)
    write_colour_shards(folder, "val", [22], seed=2)
    return folder


# 1 -------------------------------------------------------------------------------------------------------------
def test_an_interrupted_retrain_resumes_with_the_printed_command_and_branches(colour_shards, tmp_path):
    out = tmp_path / "run"
    assert _cli(base_args(colour_shards, out, "--num-epochs", "3")).returncode == 0
    original = {e: state_params(out, e) for e in (2, 3)}
    args = ["--output-dir", str(out), "--retrain", "--model-load-epoch", "1", "--lr", "0.01", "--num-epochs", "3",
            "--log-interval", "1"]
    proc = popen_train(args)
    wait_for_line(proc, "epoch 2 [1/4]")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-2000:]
    command = stderr.strip().splitlines()[-1].split("Resume with: ")[1].split()
    branch = [d for d in os.listdir(out) if d.startswith("before-retrain-from-0001-")]
    assert len(branch) == 1  # the original epochs 2 and 3 and their metrics, out of the resume's way
    moved = out / branch[0]
    assert sorted(os.listdir(moved)) == sorted([f"{PREFIX}-0002.params", f"{PREFIX}-0002.state.json",
                                                f"{PREFIX}-0002.state.params", f"{PREFIX}-0003.params",
                                                f"{PREFIX}-0003.state.json", f"{PREFIX}-0003.state.params",
                                                f"{PREFIX}-symbol.json", "config.yaml", "metrics.jsonl"])
    assert [r["epoch"] for r in read_jsonl(str(moved / "metrics.jsonl"))] == [2, 3]
    np.testing.assert_array_equal(state_params(moved, 3)["param/features.conv1.weight"],
                                  original[3]["param/features.conv1.weight"])
    resumed = _cli(command[1:])  # exactly what the message printed, after "train_xception.py"
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from epoch 2, batch" in resumed.stdout
    manifest = json.loads((out / f"{PREFIX}-0003.state.json").read_text())
    assert manifest["schedule"] == {"start_epoch": 1, "lr": 0.01, "warmup_epochs": 0}
    assert [r["epoch"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2, 3]
    assert read_jsonl(str(out / "metrics.jsonl"))[1]["lr"] == pytest.approx(0.01)


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
        new = (b"not a jpeg " * image_len)[:image_len] if how == "not_image" else \
            image[:image.index(b"\xff\xda")] + b"\0" * (image_len - image.index(b"\xff\xda"))
        f.seek(image_at)
        f.write(new)


@pytest.mark.parametrize("where, how, fragment", [
    ("val", "not_image", "holds no decodable image"),  # MXNet died with SIGFPE at validation, after an epoch
    ("train", "cut_jpeg", "holds a JPEG"),  # a valid header and no image data: SIGFPE too
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
    result = _cli(args)
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


@pytest.mark.parametrize("damage", ["zeroed", "bit_flip", "truncated", "foreign_idx"])
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
    else:
        shutil.copy(folder / "train-00000-of-00002.idx", str(rec)[:-4] + ".idx")
    result = verify(folder / "train")
    assert result.returncode == 1, result.stdout
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD:")]
    assert bad and all("train-00001-of-00002.rec" in line for line in bad), result.stdout
    if damage != "foreign_idx":
        assert any(f"index {index} " in line for line in bad), result.stdout
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


# 4 -------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only: CI and these machines run as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_at_every_checkpoint_stage_is_one_line_and_the_last_checkpoint_resumes(colour_shards,
                                                                                          tmp_path, small_disk):
    out = small_disk / "run"
    args = base_args(colour_shards, out, "--num-epochs", "1")
    assert _cli(args).returncode == 0
    sizes = {name: os.path.getsize(out / name) for name in os.listdir(out) if (out / name).is_file()}
    before = {n: c for n, c in snapshot(out).items() if n.startswith(f"{PREFIX}-0001") or n.endswith("symbol.json")}
    free = shutil.disk_usage(small_disk).free
    # Leave less room than epoch 2 needs, from nothing to almost all of it: each level fails at another stage.
    need = sizes[f"{PREFIX}-0001.state.params"] + sizes[f"{PREFIX}-0001.params"] + 40_000
    stages = set()
    for leave in (0, 2_000, 30_000, need // 3, need // 2, need - 30_000, need - 8_000):
        filler = small_disk / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free - leave))
        result = _cli(["--output-dir", str(out), "--resume", "--num-epochs", "2"])
        filler.unlink()
        if result.returncode == 0:
            RunFolder(str(out), PREFIX).remove(2)
            continue
        line = one_line(result)
        assert result.returncode in (1, 2)
        assert str(out) in line and ("free" in line or "No space" in line), line
        stages.add(line.split(" while writing ")[1].split(" in ")[0] if " while writing " in line else line)
        for name, content in before.items():  # epoch 1's checkpoint: untouched
            assert (out / name).read_bytes() == content, name
        assert RunFolder(str(out), PREFIX).latest() == 1
    assert len(stages) >= 2, stages  # the levels reached different stages of the save
    resumed = _cli(["--output-dir", str(out), "--resume", "--num-epochs", "2"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert RunFolder(str(out), PREFIX).epochs() == [1, 2]
    assert [r["epoch"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2]


# 5 -------------------------------------------------------------------------------------------------------------
def test_a_second_trainer_on_one_folder_is_refused_and_the_first_finishes(finer_shards, tmp_path):
    out = tmp_path / "run"
    first = popen_train(base_args(finer_shards, out, "--num-epochs", "6", "--batch-size", "4"))
    wait_for_line(first, "epoch 1: train loss")  # epoch 1 saved: a --resume of this run passes the plan's checks
    start = time.time()
    second = _cli(["--output-dir", str(out), "--resume"])
    assert time.time() - start < 60
    assert second.returncode == 2
    assert f"is in use by another training run (pid {first.pid})" in one_line(second)
    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr[-2000:]
    assert RunFolder(str(out), PREFIX).epochs() == list(range(1, 7))
    assert [r["epoch"] for r in read_jsonl(str(out / "metrics.jsonl"))] == list(range(1, 7))
    # Another prefix into the same folder: refused too (it would overwrite metrics.jsonl, config.yaml, best.json).
    other = _cli(base_args(finer_shards, out, "--num-epochs", "1", "--batch-size", "4", "--prefix", "other"))
    assert other.returncode == 2 and "already holds another run" in one_line(other)


def test_the_lock_names_its_holder(tmp_path):
    folder = RunFolder(str(tmp_path), PREFIX)
    with folder.lock():
        script = ("import sys; from xception_mx.runfolder import RunFolder\n"
                  f"try:\n    RunFolder({str(tmp_path)!r}, 'x').lock().__enter__()\n"
                  "except Exception as e:\n    print(e)\n")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
        assert f"in use by another training run (pid {os.getpid()})" in out.stdout
    with folder.lock():  # released on exit, and by the kernel when a holder dies
        pass


# 6 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, fragment", [
    ("label", "has label 2, outside 0..1"),
    ("empty_val", "the validation shards hold no records:"),
])
def test_bad_labels_and_an_empty_validation_set_are_found_at_start(colour_shards, tmp_path, case, fragment):
    out = tmp_path / "run"
    args = base_args(colour_shards, out, "--num-epochs", "1")
    if case == "label":
        args[args.index("--num-classes") + 1] = "2"
    else:
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "val.rec").write_bytes(b"")
        (empty / "val.idx").write_bytes(b"")
        args[args.index("--val-rec") + 1] = str(empty / "val")
    result = _cli(args)
    assert result.returncode == 2
    line = one_line(result)
    assert fragment in line
    if case == "empty_val":
        assert str(empty / "val.rec") in line
    assert not (out / "metrics.jsonl").exists()


# 7 -------------------------------------------------------------------------------------------------------------
def test_a_mid_epoch_manifest_is_never_paired_with_another_checkpoints_state(finer_shards, tmp_path):
    """SIGTERM writes a mid-epoch checkpoint; then a later one is killed between its state file and its manifest
    (simulated: a newer state file without a manifest). The resume uses the state its manifest names."""
    out = tmp_path / "run"
    args = base_args(finer_shards, out, "--num-epochs", "1", "--batch-size", "4", "--log-interval", "1",
                     "--dropout", "0")
    proc = popen_train(args)
    wait_for_line(proc, "epoch 1 [3/16]")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=180)
    assert proc.returncode == 130
    folder = RunFolder(str(out), PREFIX)
    manifest = folder.partial_manifest()
    named = folder.state_file(None, manifest)
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    # The killed later checkpoint: other arrays under a newer state name, no manifest written for them.
    newer = named.replace(manifest["files"]["token"], "ffffffffffffffff")
    shutil.copy(named, newer)
    with open(newer, "r+b") as f:
        f.seek(os.path.getsize(named) // 2)
        f.write(b"\x7f" * 64)
    for run in (out, twin):
        result = _cli(["--output-dir", str(run), "--resume"])
        assert result.returncode == 0, result.stderr[-2000:]
    a, b = state_params(out, 1), state_params(twin, 1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # A manifest whose own state file is gone is not a resume point: the run restarts from the last epoch instead.
    assert RunFolder(str(out), PREFIX).partial_manifest() is None


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
    trained = _cli(["--config", str(config)])
    assert trained.returncode == 2 and "not UTF-8" in one_line(trained)


# 10 ------------------------------------------------------------------------------------------------------------
def test_temporary_files_of_a_killed_run_are_removed_at_start(colour_shards, tmp_path):
    out = tmp_path / "run"
    assert _cli(base_args(colour_shards, out, "--num-epochs", "1")).returncode == 0
    leftovers = [out / f".{PREFIX}-0002.state.params.k1ll3d.tmp.params", out / ".metrics.jsonl.x.tmp.jsonl"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)
    (out / f".{PREFIX}-export-abc.tmp").mkdir()
    result = _cli(["--output-dir", str(out), "--resume", "--num-epochs", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed 3 temporary file(s)" in result.stdout
    assert not any(p.exists() for p in leftovers) and not (out / f".{PREFIX}-export-abc.tmp").exists()


# 11 ------------------------------------------------------------------------------------------------------------
def test_a_launcher_killed_with_sigkill_takes_its_processes_with_it(tmp_path):
    worker = tmp_path / "sleep.py"
    worker.write_text("import time\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-m", "xception_mx.launch", "-n", "2", "-s", "1", "--", str(worker)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = []
    deadline = time.time() + 60
    while len(pids) < 4 and time.time() < deadline:  # scheduler, 1 server, 2 workers
        line = proc.stderr.readline()
        if "(pid " in line:
            pids.append(int(line.rsplit("(pid ", 1)[1].split(")")[0]))
    assert len(pids) == 4
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _alive(p)]
    assert not alive, f"left running: {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# 12 ------------------------------------------------------------------------------------------------------------
def test_small_ones(colour_shards, tmp_path):
    out = tmp_path / "run"
    assert _cli(base_args(colour_shards, out, "--num-epochs", "1")).returncode == 0
    # Files follow the umask (022 here: 0644), exports and state alike.
    for name in (f"{PREFIX}-0001.state.params", f"{PREFIX}-0001.state.json", "config.yaml", "best.json",
                 f"{PREFIX}-0001.params"):
        assert oct(os.stat(out / name).st_mode & 0o777) == oct(0o666 & ~_umask()), name
    score = [sys.executable, os.path.join(ROOT, "score.py")]
    # A 0-byte params file: one line, no traceback.
    empty = tmp_path / "empty"
    shutil.copy(out / f"{PREFIX}-symbol.json", f"{empty}-symbol.json")
    open(f"{empty}-0001.params", "wb").close()
    r = subprocess.run([*score, "--model-prefix", str(empty), "--epoch", "1", "--rec", str(colour_shards / "val")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "is empty (0 bytes)" in one_line(r)
    ft = _cli(base_args(colour_shards, tmp_path / "ft", "--num-epochs", "1", "--pretrained", f"{empty}-0001.params"))
    assert ft.returncode == 2 and "is empty (0 bytes)" in one_line(ft)
    # predict --top-k 0.
    image = tmp_path / "x.png"
    import cv2
    cv2.imwrite(str(image), np.full((80, 80, 3), 200, np.uint8))
    r = subprocess.run([*score, "predict", "--model-prefix", str(out / PREFIX), "--epoch", "1", "--top-k", "0",
                        str(image)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--top-k must be at least 1" in one_line(r)


def test_a_second_signal_says_what_was_discarded(finer_shards, tmp_path):
    out = tmp_path / "run"
    script = (
        "import sys, os, signal\n"
        "from xception_mx import train\n"
        "real = train.Trainer._save\n"
        "def slow_save(self, epoch, record=None):\n"
        "    if epoch is None:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # the second signal, while the mid-epoch checkpoint is due\n"
        "    return real(self, epoch, record)\n"
        "train.Trainer._save = slow_save\n"
        "from xception_mx.cli import train_main\n"
        "sys.exit(train_main(sys.argv[1:]))\n")
    args = base_args(finer_shards, out, "--num-epochs", "2", "--batch-size", "4", "--log-interval", "1")
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, "epoch 2 [2/16]")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130
    line = [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith("[")][-1]
    assert "second signal" in line and "mid-epoch checkpoint were discarded" in line
    assert "resume from the end of epoch 1" in line
    assert RunFolder(str(out), PREFIX).epochs() == [1] and RunFolder(str(out), PREFIX).partial_manifest() is None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The recovery interval ------------------------------------------------------------------------------------------
def test_sigkill_mid_epoch_loses_at_most_one_interval_and_resumes_bit_exact(finer_shards, tmp_path):
    args = ("--num-epochs", "2", "--batch-size", "4", "--dropout", "0", "--checkpoint-interval", "0.002",
            "--ema", "0.7", "--log-interval", "1")
    straight = tmp_path / "straight"
    assert _cli(base_args(finer_shards, straight, *args)).returncode == 0
    killed = tmp_path / "killed"
    proc = popen_train(base_args(finer_shards, killed, *args))
    line = wait_for_line(proc, "recovery checkpoint: epoch 2")
    for line in proc.stdout:  # let it train on past the checkpoint, then kill it between two of them
        if "epoch 2 [" in line:
            break
    proc.kill()
    proc.communicate(timeout=60)
    partial = RunFolder(str(killed), PREFIX).partial_manifest()
    assert partial is not None and partial["in_progress"]["epoch"] == 2
    saved_at = partial["in_progress"]["batches_done"]
    resumed = _cli(["--output-dir", str(killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from epoch 2, batch {saved_at}" in resumed.stdout
    a, b = state_params(straight, 2), state_params(killed, 2)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
