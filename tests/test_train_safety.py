"""Trainer paths beyond the basics: exact resume with Adam + mixup, --keep-last, stopping on a non-finite loss."""
import json
import shutil

import numpy as np
import pytest

from helpers import base_args, state_params, strip_times, train_cli
from xception_mx.metrics import read_jsonl
from xception_mx.runfolder import RunFolder

pytestmark = pytest.mark.slow  # every test runs train_xception.py


def test_adam_with_mixup_resumes_bit_exact(colour_shards, tmp_path):
    """Adam keeps two state arrays per weight and per-weight update counts (bias correction): all must survive."""
    extra = ("--optimizer", "adam", "--lr", "0.002", "--mixup", "0.4", "--no-wd-bn-bias", "--lr-mode", "exp",
             "--lr-decay", "0.5", "--lr-decay-period", "1")
    straight = tmp_path / "straight"
    assert train_cli(base_args(colour_shards, straight, *extra)).returncode == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    RunFolder(str(resumed), "xception_slim").remove(2)
    result = train_cli(["--output-dir", str(resumed), "--resume"])
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = state_params(straight, 2), state_params(resumed, 2)
    assert any(k.endswith(".1") for k in a if k.startswith("optim/"))  # Adam's (mean, var) pairs
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    lines = strip_times(read_jsonl(str(straight / "metrics.jsonl")))
    assert lines == strip_times(read_jsonl(str(resumed / "metrics.jsonl")))
    assert lines[1]["lr"] == lines[0]["lr"] * 0.5
    manifest = json.loads((resumed / "xception_slim-0002.state.json").read_text())
    assert set(manifest["optimizer"]["update_counts"].values()) == {8}


def test_keep_last_keeps_the_best_epoch(colour_shards, tmp_path):
    out = tmp_path / "run"
    assert train_cli(base_args(colour_shards, out, "--num-epochs", "4", "--keep-last", "1")).returncode == 0
    best = json.loads((out / "best.json").read_text())["epoch"]
    assert RunFolder(str(out), "xception_slim").epochs() == sorted({best, 4})
    assert (out / "xception_slim-symbol.json").is_file()


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(colour_shards, tmp_path):
    out = tmp_path / "run"
    assert train_cli(base_args(colour_shards, out, "--num-epochs", "1")).returncode == 0
    epoch1 = state_params(out, 1)
    result = train_cli(["--output-dir", str(out), "--retrain", "--model-load-epoch", "1", "--num-epochs", "3",
                        "--lr", "3e38", "--lr-mode", "exp"])
    assert result.returncode == 1
    lines = [l for l in result.stderr.strip().splitlines() if l.strip() and not l.startswith("[")]
    assert len(lines) == 1 and "loss is not finite at epoch 2" in lines[0], result.stderr
    assert "last good checkpoint is epoch 1" in lines[0]
    assert RunFolder(str(out), "xception_slim").epochs() == [1]
    np.testing.assert_array_equal(state_params(out, 1)["param/features.conv1.weight"],
                                  epoch1["param/features.conv1.weight"])


def test_resume_refuses_a_new_schedule(colour_shards, tmp_path):
    out = tmp_path / "run"
    assert train_cli(base_args(colour_shards, out, "--num-epochs", "1")).returncode == 0
    result = train_cli(["--output-dir", str(out), "--resume", "--num-epochs", "2", "--lr", "0.5"])
    assert result.returncode == 2
    lines = [l for l in result.stderr.strip().splitlines() if l.strip() and not l.startswith("[")]
    assert len(lines) == 1 and "--lr with --resume" in lines[0] and "--retrain" in lines[0]
    # The same value as saved is no change, and --num-epochs may grow.
    again = train_cli(["--output-dir", str(out), "--resume", "--num-epochs", "2", "--lr", "0.05"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert RunFolder(str(out), "xception_slim").epochs() == [1, 2]
