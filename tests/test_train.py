"""The trainer: learning, multi-device equivalence, bit-exact resume, retrain, device changes, crash safety, errors."""
import json
import shutil
import signal
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from helpers import (
    ROOT,
    assert_same_states,
    base_args,
    no_bn_net,
    popen_train,
    run,
    signal_at_line,
    state_params,
    straight_and_resumed,
    strip_times,
    train_cli,
)
from xception_mx.metrics import read_jsonl
from xception_mx.runfolder import RunFolder
from xception_mx.step import train_step


@pytest.mark.slow
def test_loss_decreases_and_files_are_written(colour_shards, tmp_path):
    out = tmp_path / "run"
    run(base_args(colour_shards, out, "--num-epochs", "8"))
    records = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["epoch"] for r in records] == list(range(1, 9))
    assert set(records[0]) >= {"epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                               "samples_per_sec", "time_s"}
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["val_top1"] > 0.8  # 4 colour classes: chance is 0.25
    for name in ("config.yaml", "curves.png", "best.json", "train.log", "xception_slim-symbol.json",
                 "xception_slim-0008.params", "xception_slim-0008.state.params", "xception_slim-0008.state.json"):
        assert (out / name).is_file(), name
    assert RunFolder(str(out), "xception_slim").epochs() == list(range(1, 9))
    best = json.loads((out / "best.json").read_text())
    assert best["val_top1"] == max(r["val_top1"] for r in records)


def test_two_devices_match_one_device_on_the_same_global_batch():
    x = mx.nd.random.uniform(-1, 1, shape=(8, 3, 12, 12))
    y = mx.nd.array([0, 1, 2, 0, 1, 2, 0, 1])
    params = []
    for ctx in ([mx.cpu(0)], [mx.cpu(0), mx.cpu(1)]):
        net = no_bn_net(ctx)
        trainer = gluon.Trainer(net.collect_params(), "nag", {"learning_rate": 0.5, "momentum": 0.9},
                                kvstore="device", update_on_kvstore=False)
        for _ in range(3):
            train_step(net, trainer, gluon.loss.SoftmaxCrossEntropyLoss(), x, y, ctx, 8)
        params.append([p.data(ctx[-1]).asnumpy() for p in net.collect_params().values()])
    initial = no_bn_net([mx.cpu(0)])
    assert not np.allclose(params[0][0], list(initial.collect_params().values())[0].data().asnumpy())
    for one, two in zip(*params):
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_is_bit_exact(colour_shards, tmp_path):
    """2 epochs straight == 1 epoch, --resume, 1 epoch: bit for bit (regression test of the apache/mxnet#13829
    workaround: without MXNet's serial engine the two runs differ in the last bits)."""
    extra = ("--ema", "0.8", "--label-smoothing", "0.1")
    straight, resumed = straight_and_resumed(colour_shards, tmp_path, *extra)
    a = assert_same_states(straight, resumed, 2)
    assert any(k.startswith("optim/") for k in a) and any(k.startswith("ema/") for k in a)
    lines_a = strip_times(read_jsonl(str(straight / "metrics.jsonl")))
    lines_b = strip_times(read_jsonl(str(resumed / "metrics.jsonl")))
    assert lines_a == lines_b and len(lines_a) == 2
    manifest = json.loads((resumed / "xception_slim-0002.state.json").read_text())
    assert manifest["optimizer"]["num_update"] == 2 * 4  # 64 images / 16 per batch, 2 epochs
    assert manifest["engine"] == "NaiveEngine"


@pytest.mark.slow
def test_retrain_starts_at_the_new_lr_and_loads_weights(colour_shards, tmp_path):
    out = tmp_path / "run"
    run(base_args(colour_shards, out, "--num-epochs", "1", "--warmup-epochs", "0"))
    epoch1 = state_params(out, 1)
    run(base_args(colour_shards, out, "--num-epochs", "3", "--retrain", "--model-load-epoch", "1", "--lr", "0.007",
                  "--warmup-epochs", "0"))
    records = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[1]["lr"] == pytest.approx(0.007, rel=1e-9)
    assert records[2]["lr"] < 0.007  # cosine from 0.007 over epochs 2-3
    manifest = json.loads((out / "xception_slim-0002.state.json").read_text())
    assert manifest["schedule"] == {"start_epoch": 1, "lr": 0.007, "warmup_epochs": 0}
    # Epoch 2 continued from epoch 1's weights (not a fresh initialisation): momentum carried over too.
    assert manifest["optimizer"]["num_update"] == 2 * 4
    conv1 = "param/features.conv1.weight"
    assert not np.array_equal(state_params(out, 2)[conv1], epoch1[conv1])


@pytest.mark.slow
def test_model_load_epoch_without_retrain_is_resume(colour_shards, tmp_path):
    out = tmp_path / "run"
    assert train_cli(base_args(colour_shards, out, "--num-epochs", "2")).returncode == 0
    before = read_jsonl(str(out / "metrics.jsonl"))
    RunFolder(str(out), "xception_slim").remove(2)
    result = train_cli(base_args(colour_shards, out, "--num-epochs", "2", "--model-load-epoch", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from the end of epoch 1" in result.stdout
    assert strip_times(read_jsonl(str(out / "metrics.jsonl"))) == strip_times(before)


@pytest.mark.slow
def test_resume_on_fewer_devices_keeps_the_schedule(colour_shards, tmp_path):
    straight = tmp_path / "straight"
    run(base_args(colour_shards, straight, "--cpus", "2", "--num-epochs", "3"))
    moved = tmp_path / "moved"
    shutil.copytree(straight, moved)
    for epoch in (2, 3):
        RunFolder(str(moved), "xception_slim").remove(epoch)
    run(base_args(colour_shards, moved, "--cpus", "1", "--num-epochs", "3", "--resume", "1"))
    a, b = read_jsonl(str(straight / "metrics.jsonl")), read_jsonl(str(moved / "metrics.jsonl"))
    assert [r["lr"] for r in a] == pytest.approx([r["lr"] for r in b], rel=1e-12)
    assert b[2]["lr"] < b[1]["lr"] < b[0]["lr"]
    manifest = json.loads((moved / "xception_slim-0003.state.json").read_text())
    assert manifest["optimizer"]["num_update"] == 3 * 4
    assert manifest["config"]["cpus"] == 1


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_epoch(colour_shards, tmp_path):
    out = tmp_path / "run"
    # Kill the process (SIGKILL: no cleanup) in the middle of writing epoch 2's state file.
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.argv = ["train_xception.py"] + {base_args(colour_shards, out)!r}
        import mxnet as mx
        from xception_mx import checkpoint
        real_save = mx.nd.save
        def save_then_die(path, arrays):
            if "-0002.state.params" in os.path.basename(path):  # the temporary file of epoch 2's state
                with open(path, "wb") as f:
                    f.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(path, arrays)
        mx.nd.save = save_then_die
        from xception_mx.cli import train_main
        sys.exit(train_main())
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert RunFolder(str(out), "xception_slim").epochs() == [1]
    epoch1 = state_params(out, 1)
    resumed = train_cli(base_args(colour_shards, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from the end of epoch 1" in resumed.stdout
    assert RunFolder(str(out), "xception_slim").epochs() == [1, 2]
    np.testing.assert_array_equal(state_params(out, 1)["param/features.conv1.weight"],
                                  epoch1["param/features.conv1.weight"])
    assert [r["epoch"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2]


@pytest.mark.slow
def test_sigterm_mid_epoch_writes_a_checkpoint_that_resumes(colour_shards, tmp_path):
    out = tmp_path / "run"
    args = base_args(colour_shards, out, "--num-epochs", "1", "--log-interval", "1")
    proc = popen_train(args)
    signal_at_line(proc, "[1/4]", signal.SIGTERM, timeout=180)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr.strip().splitlines()[-1]
    partial = RunFolder(str(out), "xception_slim").partial_manifest()
    assert partial is not None and partial.in_progress.batches_done in (1, 2, 3)
    # The command the message suggests, nothing more: the saved config supplies the rest.
    resumed = train_cli(["--output-dir", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from epoch 1, batch" in resumed.stdout
    assert RunFolder(str(out), "xception_slim").epochs() == [1]
    assert RunFolder(str(out), "xception_slim").partial_manifest() is None
    assert json.loads((out / "xception_slim-0001.state.json").read_text())["optimizer"]["num_update"] == 4


@pytest.mark.parametrize("case, fragment", [
    ("missing_rec", "does not exist"),
    ("missing_idx", ".idx"),
    ("bad_gpus", "gpus must be a comma-separated list of integers"),
    ("gpus_on_cpu_build", "sees none"),
    ("unknown_key", "unknown key 'batchsize' (did you mean 'batch_size'?)"),
    ("unknown_flag", "unrecognized arguments: --batchsize"),
    ("bad_type", "lr must be a number"),
    ("impossible", "dropout must be in [0, 1)"),
    ("indivisible_batch", "not divisible by the 3 devices"),
    ("missing_checkpoint", "epochs that exist: none"),
    ("label_out_of_range", "num_classes is 2, but"),
    ("existing_run", "already holds checkpoints (epochs 1..1): pass --resume"),
    ("corrupt_record", "record 5 (byte"),  # MXNet's reader would abort the process mid-epoch instead
])
@pytest.mark.slow
def test_bad_input_is_one_clear_line(case, fragment, colour_shards, tmp_path):
    out = tmp_path / "run"
    args = base_args(colour_shards, out, "--num-epochs", "1")
    if case == "missing_rec":
        args[1] = str(tmp_path / "nowhere" / "train")
    elif case == "missing_idx":
        broken = tmp_path / "broken"
        broken.mkdir()
        shutil.copy(colour_shards / "train-00000-of-00002.rec", broken / "train-00000-of-00001.rec")
        args[1] = str(broken / "train")
    elif case == "bad_gpus":
        args += ["--gpus", "0,x"]
    elif case == "gpus_on_cpu_build":
        args += ["--gpus", "0,1"]
    elif case == "unknown_key":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("batchsize: 8\n")
        args += ["--config", str(cfg)]
    elif case == "unknown_flag":
        args += ["--batchsize", "8"]
    elif case == "bad_type":
        args += ["--lr", "fast"]
    elif case == "impossible":
        args += ["--dropout", "1.5"]
    elif case == "indivisible_batch":
        args += ["--cpus", "3"]
    elif case == "missing_checkpoint":
        args += ["--resume", "3"]
    elif case == "corrupt_record":
        broken = tmp_path / "broken"
        shutil.copytree(colour_shards, broken)
        offsets = [int(line.split()[1]) for line in (broken / "train-00001-of-00002.idx").read_text().split("\n")
                   if line.strip()]
        with open(broken / "train-00001-of-00002.rec", "r+b") as f:
            f.seek(offsets[5])
            f.write(b"\xde\xad\xbe\xef" * 2)
        args[1] = str(broken / "train")
    elif case == "label_out_of_range":
        args[args.index("--num-classes") + 1] = "2"
    out.mkdir()
    if case == "existing_run":
        run(args)
    (out / "keep.txt").write_text("user data")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = train_cli(args)
    assert result.returncode != 0
    lines = [l for l in result.stderr.strip().splitlines() if l.strip() and not l.startswith("[")]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    for name, content in before.items():  # nothing already written is damaged
        assert (out / name).read_bytes() == content, name
