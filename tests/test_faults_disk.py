"""Fault injection, a full disk outside the trainer: every command that writes (xception-deploy's four, score.py
--json, im2rec-tools pack) ends in one line naming the folder and its free space, exit 1, on a real tmpfs; what was
in the folder before is untouched and no temporary file is left."""
import os
import shlex
import shutil
import subprocess
import sys

import mxnet as mx
import pytest

from helpers import ROOT, TINY_FILTERS, one_line, tmpfs
from xception_mx import get_model
from xception_mx.checkpoint import export_atomic
from xception_mx.cpuinfo import cpu_flags, cpu_model
from xception_mx.protocol import Preprocess

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs holding a 'before.txt' and a filler that leaves no room."""
    with tmpfs(tmp_path / "disk", "2m") as mount:
        (mount / "before.txt").write_text("written before")
        with open(mount / "filler", "wb") as f:
            f.write(b"\0" * shutil.disk_usage(mount).free)
        yield mount


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    net = get_model("xception_slim", num_classes=4, filter_list=TINY_FILTERS)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 72, 72)))
    export_atomic(net, str(folder / "m"), 1)
    Preprocess(input_size=72, crop_pct=0.9).write(str(folder / "m"))
    return folder / "m"


def _command(case, export, shards, out):
    deploy = [sys.executable, "-m", "xception_mx.deploy"]
    model = ["--model-prefix", str(export), "--epoch", "1"]
    return {
        "softmax-head": [*deploy, "softmax-head", *model, "--out", str(out / "head")],
        "bfloat16": [*deploy, "bfloat16", *model, "--out", str(out / "bf16")],
        "int8": [*deploy, "int8", *model, "--calib-rec", str(shards / "val"), "--num-calib-images", "16", "--out",
                 str(out / "int8")],
        "onnx": [*deploy, "onnx", *model, "--out", str(out / "m.onnx")],
        "score-json": [sys.executable, os.path.join(ROOT, "score.py"), *model, "--rec", str(shards / "val"),
                       "--json", str(out / "score.json")],
        "pack": [sys.executable, "-m", "im2rec_tools", "pack", str(shards / "list.lst"), str(out / "train"),
                 "--image-root", str(shards / "images")],
    }[case]


@pytest.mark.parametrize("case", ["softmax-head", "bfloat16", "int8", "onnx", "score-json", "pack"])
def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_it_as_it_was(case, tiny_export, colour_shards,
                                                                          full_disk, tmp_path):
    needs = {"bfloat16": {"avx512_bf16"}, "int8": {"avx512_vnni", "avx_vnni"}}.get(case)
    if needs and not needs & cpu_flags():
        pytest.skip(f"this CPU ({cpu_model()}) lacks {' / '.join(sorted(needs))}: xception-deploy {case} refuses")
    if case == "pack":
        import cv2
        import numpy as np

        images = tmp_path / "src" / "images" / "a"
        images.mkdir(parents=True)
        rng = np.random.RandomState(0)
        for i in range(8):
            cv2.imwrite(str(images / f"{i}.png"), rng.randint(0, 255, (96, 96, 3), np.uint8))
        (tmp_path / "src" / "list.lst").write_text("".join(f"{i}\t0\ta/{i}.png\n" for i in range(8)))
        shards = tmp_path / "src"
    else:
        shards = colour_shards
    before = sorted(os.listdir(full_disk))
    result = subprocess.run(_command(case, tiny_export, shards, full_disk), capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    if case == "pack":  # its progress bar shares stderr
        assert "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
    else:
        line = one_line(result)
    assert result.returncode == 1, result.stderr[-2000:]
    assert str(full_disk) in line and "free" in line and "disk full" in line, line
    assert (full_disk / "before.txt").read_text() == "written before"
    assert sorted(os.listdir(full_disk)) == before  # nothing half-written, no temporary file


def test_a_full_tensorboard_disk_stops_the_run_in_one_line_without_hanging_and_it_resumes(colour_shards, full_disk,
                                                                                        tmp_path):
    from helpers import base_args, train_cli

    out = tmp_path / "run"
    board = full_disk / "tb"
    args = base_args(colour_shards, out, "--num-epochs", "2", "--tensorboard", str(board), "--log-interval", "1")
    result = train_cli(args, timeout=240)  # tensorboardX's writer thread dies; writing on would block forever
    line = one_line(result)
    assert result.returncode == 1 and "while writing TensorBoard event files in" in line and str(board) in line, line
    (full_disk / "filler").unlink()
    command = line.split("free space, then ")[1]
    if "resume from" in command:
        resumed = train_cli(shlex.split(command.split(" with: ")[1])[1:], timeout=240)
    else:  # no checkpoint yet: start again
        resumed = train_cli(args, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
