"""Fault injection, the run folder: a full disk at every checkpoint stage, two trainers on one folder, the lock,
file modes and empty weight files; each checking the exit code, the one-line message and that what was written before
is intact."""
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import PREFIX, ROOT, base_args, one_line, popen_train, tmpfs, train_cli, wait_for_line
from xception_mx.metrics import read_jsonl
from xception_mx.runfolder import RunFolder

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def snapshot(folder) -> dict:
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, p)) and p not in ("train.log", ".lock")}


# 4 -------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs."""
    with tmpfs(tmp_path / "disk", "3m") as mount:
        yield mount


def test_a_full_disk_at_every_checkpoint_stage_is_one_line_and_the_last_checkpoint_resumes(colour_shards,
                                                                                          tmp_path, small_disk):
    out = small_disk / "run"
    args = base_args(colour_shards, out, "--num-epochs", "1")
    assert train_cli(args).returncode == 0
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
        result = train_cli(["--output-dir", str(out), "--resume", "--num-epochs", "2"])
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
    resumed = train_cli(["--output-dir", str(out), "--resume", "--num-epochs", "2"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert RunFolder(str(out), PREFIX).epochs() == [1, 2]
    assert [r["epoch"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2]


def test_a_full_disk_at_every_stage_of_a_fresh_run_names_the_next_step_and_it_works(colour_shards, small_disk):
    """From the first export on: the line says resume (naming the real checkpoint) or start again, and doing what it
    says, after freeing space, finishes the run."""
    out = small_disk / "run"
    args = base_args(colour_shards, out, "--num-epochs", "2")
    assert train_cli(args).returncode == 0
    need = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) // 2  # about one epoch's files
    shutil.rmtree(out)
    stages = set()
    for leave in (60_000, need // 2, need, need + need // 2):
        filler = small_disk / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, shutil.disk_usage(small_disk).free - leave))
        result = train_cli(args)
        filler.unlink()
        if result.returncode != 0:
            line = one_line(result)
            assert result.returncode == 1 and "intact" not in line, line
            stages.add(line.split(" while writing ")[1].split(" in ")[0])
            if "start the run again" in line:
                again = train_cli(args)
            else:
                again = train_cli(shlex.split(line.split(" with: ")[1])[1:])
            assert again.returncode == 0, (line, again.stderr[-2000:])
        assert RunFolder(str(out), PREFIX).epochs()[-1] == 2
        assert [r["epoch"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2]
        shutil.rmtree(out)
    assert len(stages) >= 2, stages
    assert any("epoch 1" in stage for stage in stages), stages


# 5 -------------------------------------------------------------------------------------------------------------
def test_a_second_trainer_on_one_folder_is_refused_and_the_first_finishes(colour_shards, tmp_path):
    out = tmp_path / "run"
    first = popen_train(base_args(colour_shards, out, "--num-epochs", "6", "--batch-size", "4"))
    wait_for_line(first, "epoch 1: train loss")  # epoch 1 saved: a --resume of this run passes the plan's checks
    start = time.time()
    second = train_cli(["--output-dir", str(out), "--resume"])
    assert time.time() - start < 60
    assert second.returncode == 2
    assert f"is in use by another training run (pid {first.pid})" in one_line(second)
    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr[-2000:]
    assert RunFolder(str(out), PREFIX).epochs() == list(range(1, 7))
    assert [r["epoch"] for r in read_jsonl(str(out / "metrics.jsonl"))] == list(range(1, 7))
    # Another prefix into the same folder: refused too (it would overwrite metrics.jsonl, config.yaml, best.json).
    other = train_cli(base_args(colour_shards, out, "--num-epochs", "1", "--batch-size", "4", "--prefix", "other"))
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


# 12 ------------------------------------------------------------------------------------------------------------
def test_small_ones(colour_shards, tmp_path):
    out = tmp_path / "run"
    assert train_cli(base_args(colour_shards, out, "--num-epochs", "1")).returncode == 0
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
    ft = train_cli(base_args(colour_shards, tmp_path / "ft", "--num-epochs", "1", "--pretrained",
                             f"{empty}-0001.params"))
    assert ft.returncode == 2 and "is empty (0 bytes)" in one_line(ft)
    # predict --top-k 0.
    image = tmp_path / "x.png"
    import cv2
    cv2.imwrite(str(image), np.full((80, 80, 3), 200, np.uint8))
    r = subprocess.run([*score, "predict", "--model-prefix", str(out / PREFIX), "--epoch", "1", "--top-k", "0",
                        str(image)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--top-k must be at least 1" in one_line(r)


# The lines that used to mislead (issue: reliability round 3, item 7), each saying what is wrong and what to do.
@pytest.mark.parametrize("case, fragment", [
    ("config_is_a_folder", "is a folder: give a YAML file in it"),
    ("output_dir_is_a_file", "is a file, not a folder"),
    ("output_dir_empty", "output_dir is empty: give --output-dir FOLDER"),
    ("prefix_is_a_path", "prefix must be a plain file name"),
    ("resume_with_another_prefix", "holds checkpoints of prefix 'xception_slim', not 'xception'"),
    ("softmax_head_of_a_softmax_head", "is a softmax-head export"),
    ("pickle_as_params", "is not an MXNet params file"),
])
def test_misleading_lines_now_say_what_is_wrong(trained_run, tmp_path, case, fragment):
    shards, out = trained_run
    (tmp_path / "afile").write_text("x")
    deploy = ["-m", "xception_mx.deploy", "softmax-head", "--epoch", "1", "--out", str(tmp_path / "h2")]
    if case == "softmax_head_of_a_softmax_head":
        head = subprocess.run([sys.executable, "-m", "xception_mx.deploy", "softmax-head", "--model-prefix",
                               str(out / PREFIX), "--epoch", "1", "--out", str(tmp_path / "head")], cwd=ROOT)
        assert head.returncode == 0
        shutil.move(tmp_path / "head-0000.params", tmp_path / "head-0001.params")
    elif case == "pickle_as_params":
        import pickle

        shutil.copy(out / f"{PREFIX}-symbol.json", tmp_path / "pk-symbol.json")
        (tmp_path / "pk-0001.params").write_bytes(pickle.dumps({"w": [1.0]}))
    commands = {
        "config_is_a_folder": ["--config", str(tmp_path)],
        "output_dir_is_a_file": base_args(shards, tmp_path / "afile"),
        "output_dir_empty": base_args(shards, ""),
        "prefix_is_a_path": base_args(shards, tmp_path / "r", "--prefix", "../x"),
        "resume_with_another_prefix": ["--output-dir", str(out), "--resume", "--model", "xception"],
        "softmax_head_of_a_softmax_head": [*deploy, "--model-prefix", str(tmp_path / "head")],
        "pickle_as_params": [*deploy, "--model-prefix", str(tmp_path / "pk")],
    }
    args = commands[case]
    if args[0] == "-m":
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    else:
        result = train_cli(args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert fragment in one_line(result)
    if case == "resume_with_another_prefix":  # and the command it prints works
        command = shlex.split(one_line(result).split("resume them with: ")[1])
        resumed = train_cli([*command[1:], "--num-epochs", "2"])
        assert resumed.returncode == 0, resumed.stderr[-2000:]


@pytest.fixture(scope="module")
def trained_run(colour_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train_cli(base_args(colour_shards, out, "--num-epochs", "1")).returncode == 0
    return colour_shards, out



def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
