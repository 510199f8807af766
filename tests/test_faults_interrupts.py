"""Fault injection, interruptions: a signal or SIGKILL mid-run (a retrain, a mid-epoch checkpoint, a second signal,
between recovery checkpoints), the temporary files a killed run leaves, a killed launcher; each checking the exit
code, the message and that the run resumes from what was written before."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import (
    LAUNCH,
    PREFIX,
    ROOT,
    assert_same_states,
    base_args,
    one_line,
    popen_train,
    signal_at_line,
    state_params,
    train_cli,
    wait_for_line,
)
from xception_mx.metrics import read_jsonl
from xception_mx.runfolder import RunFolder

pytestmark = [pytest.mark.faults, pytest.mark.slow]


# 1 -------------------------------------------------------------------------------------------------------------
def test_an_interrupted_retrain_resumes_with_the_printed_command_and_branches(colour_shards, tmp_path):
    out = tmp_path / "my run é (v1) it's"  # the printed command is shell-quoted
    assert train_cli(base_args(colour_shards, out, "--num-epochs", "3")).returncode == 0
    original = {e: state_params(out, e) for e in (2, 3)}
    args = ["--output-dir", str(out), "--retrain", "--model-load-epoch", "1", "--lr", "0.01", "--num-epochs", "3",
            "--log-interval", "1"]
    proc = popen_train(args)
    signal_at_line(proc, "epoch 2 [1/4]", signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-2000:]
    command = shlex.split(stderr.strip().splitlines()[-1].split("Resume with: ")[1])
    assert command[:3] == ["train_xception.py", "--output-dir", str(out)]
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
    resumed = train_cli(command[1:])  # exactly what the message printed, after "train_xception.py"
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from epoch 2, batch" in resumed.stdout
    manifest = json.loads((out / f"{PREFIX}-0003.state.json").read_text())
    assert manifest["schedule"] == {"start_epoch": 1, "lr": 0.01, "warmup_epochs": 0}
    assert [r["epoch"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2, 3]
    assert read_jsonl(str(out / "metrics.jsonl"))[1]["lr"] == pytest.approx(0.01)


# 7 -------------------------------------------------------------------------------------------------------------
def test_a_mid_epoch_manifest_is_never_paired_with_another_checkpoints_state(colour_shards, tmp_path):
    """SIGTERM writes a mid-epoch checkpoint; then a later one is killed between its state file and its manifest
    (simulated: a newer state file without a manifest). The resume uses the state its manifest names."""
    out = tmp_path / "run"
    args = base_args(colour_shards, out, "--num-epochs", "1", "--batch-size", "4", "--log-interval", "1",
                     "--dropout", "0")
    proc = popen_train(args)
    signal_at_line(proc, "epoch 1 [3/16]", signal.SIGTERM)
    proc.communicate(timeout=180)
    assert proc.returncode == 130
    folder = RunFolder(str(out), PREFIX)
    manifest = folder.partial_manifest()
    named = folder.state_file(None, manifest)
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    # The killed later checkpoint: other arrays under a newer state name, no manifest written for them.
    newer = named.replace(manifest.files.token, "ffffffffffffffff")
    shutil.copy(named, newer)
    with open(newer, "r+b") as f:
        f.seek(os.path.getsize(named) // 2)
        f.write(b"\x7f" * 64)
    for run in (out, twin):
        result = train_cli(["--output-dir", str(run), "--resume"])
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_states(out, twin, 1)
    # A manifest whose own state file is gone is not a resume point: the run restarts from the last epoch instead.
    assert RunFolder(str(out), PREFIX).partial_manifest() is None


# 12, the second signal -----------------------------------------------------------------------------------------
def test_a_second_signal_says_what_was_discarded(colour_shards, tmp_path):
    out = tmp_path / "run"
    script = (
        "import sys, os, signal\n"
        "from xception_mx import writer\n"
        "real = writer.RunWriter.save_stopped\n"
        "def slow_save(self, state):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # the second signal, while the mid-epoch checkpoint is due\n"
        "    return real(self, state)\n"
        "writer.RunWriter.save_stopped = slow_save\n"
        "from xception_mx.cli import train_main\n"
        "sys.exit(train_main(sys.argv[1:]))\n")
    args = base_args(colour_shards, out, "--num-epochs", "2", "--batch-size", "4", "--log-interval", "1")
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    signal_at_line(proc, "epoch 2 [2/16]", signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130
    line = [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith("[")][-1]
    assert "second signal" in line and "mid-epoch checkpoint were discarded" in line
    assert "resume from the end of epoch 1" in line
    assert RunFolder(str(out), PREFIX).epochs() == [1] and RunFolder(str(out), PREFIX).partial_manifest() is None


# The recovery interval ------------------------------------------------------------------------------------------
def test_sigkill_mid_epoch_loses_at_most_one_interval_and_resumes_bit_exact(colour_shards, tmp_path):
    args = ("--num-epochs", "2", "--batch-size", "4", "--dropout", "0", "--checkpoint-interval", "0.002",
            "--ema", "0.7", "--log-interval", "1")
    straight = tmp_path / "straight"
    assert train_cli(base_args(colour_shards, straight, *args)).returncode == 0
    killed = tmp_path / "killed"
    proc = popen_train(base_args(colour_shards, killed, *args))
    line = wait_for_line(proc, "recovery checkpoint: epoch 2")
    for line in proc.stdout:  # let it train on past the checkpoint, then kill it between two of them
        if "epoch 2 [" in line:
            break
    proc.kill()
    proc.communicate(timeout=60)
    partial = RunFolder(str(killed), PREFIX).partial_manifest()
    assert partial is not None and partial.in_progress.epoch == 2
    saved_at = partial.in_progress.batches_done
    resumed = train_cli(["--output-dir", str(killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from epoch 2, batch {saved_at}" in resumed.stdout
    assert_same_states(straight, killed, 2)


# 10 ------------------------------------------------------------------------------------------------------------
def test_temporary_files_of_a_killed_run_are_removed_at_start(colour_shards, tmp_path):
    out = tmp_path / "run"
    assert train_cli(base_args(colour_shards, out, "--num-epochs", "1")).returncode == 0
    leftovers = [out / f".{PREFIX}-0002.state.params.k1ll3d.tmp.params", out / ".metrics.jsonl.x.tmp.jsonl"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)
    (out / f".{PREFIX}-export-abc.tmp").mkdir()
    result = train_cli(["--output-dir", str(out), "--resume", "--num-epochs", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed 3 temporary file(s)" in result.stdout
    assert not any(p.exists() for p in leftovers) and not (out / f".{PREFIX}-export-abc.tmp").exists()


# 11 ------------------------------------------------------------------------------------------------------------
def test_a_launcher_killed_with_sigkill_takes_its_processes_with_it(tmp_path):
    worker = tmp_path / "sleep.py"
    worker.write_text("import time\ntime.sleep(120)\n")
    proc = subprocess.Popen([*LAUNCH, "-n", "2", "-s", "1", "--", str(worker)],
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


# Reliability round 3, item 1: a SIGKILL at every write of epoch 1 leaves a folder that is either resumable or free
# for a fresh start, and the line a user gets says which (the command it names works).
_KILL_AT = {  # stage -> (module, class or "", the function patched to kill at its first call)
    "export": ("xception_mx.writer", "", "export_atomic"),
    "state arrays": ("xception_mx.checkpoint", "", "atomic_path"),
    "manifest": ("xception_mx.runfolder", "RunFolder", "write_manifest"),
    "metrics line": ("xception_mx.writer", "", "append_synced"),
    "best.json": ("xception_mx.writer", "", "atomic_write_text"),
    "curves": ("xception_mx.writer", "", "plot_curves"),
    "TensorBoard": ("xception_mx.board", "Board", "flush"),  # the first flush: at epoch 1's checkpoint
}


@pytest.mark.parametrize("stage", list(_KILL_AT))
def test_a_sigkill_at_any_write_of_epoch_one_leaves_a_folder_the_next_command_continues(colour_shards, tmp_path,
                                                                                      stage):
    out = tmp_path / "run"
    board = ["--tensorboard", str(tmp_path / "tb")] if stage == "TensorBoard" else []
    args = base_args(colour_shards, out, "--num-epochs", "2", "--prefix", "my_prefix", *board)
    module, cls, name = _KILL_AT[stage]
    script = (
        "import importlib, os, signal, sys\n"
        f"owner = importlib.import_module({module!r})\n"
        f"owner = getattr(owner, {cls!r}) if {cls!r} else owner\n"
        f"real = getattr(owner, {name!r})\n"
        "def dying(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"setattr(owner, {name!r}, dying)\n"
        "from xception_mx.cli import train_main\n"
        f"sys.exit(train_main({[str(a) for a in args]!r}))\n")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "epoch 1 [" in killed.stdout  # it died in epoch 1's writes, not at start
    resumed = train_cli(["--output-dir", str(out), "--resume"])
    if resumed.returncode != 0:  # nothing to resume: the line says so, and the fresh start it points to works
        assert resumed.returncode == 2 and "start without --resume" in one_line(resumed), resumed.stderr[-2000:]
        again = train_cli(args)
        assert again.returncode == 0, again.stderr[-2000:]
    assert RunFolder(str(out), "my_prefix").epochs()[-1] == 2
    assert [r["epoch"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2]
