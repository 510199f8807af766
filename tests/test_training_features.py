"""Gradient accumulation, gradient clipping and TensorBoard event files."""
import dataclasses
import glob
import os
import shutil
import signal
import struct
import time

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from helpers import assert_same_states, base_args, no_bn_net, popen_train, signal_at_line, train_cli
from xception_mx.errors import UserError
from xception_mx.plan import plan_run
from xception_mx.runfolder import RunFolder
from xception_mx.step import TrainStep


def _updates(accumulate, ctx, updates=3, clip=0.0):
    """Parameters after ``updates`` NAG updates of a 16-image batch (no BatchNorm, no dropout)."""
    rng = np.random.RandomState(0)
    net = no_bn_net(ctx)
    trainer = gluon.Trainer(net.collect_params(), "nag", {"learning_rate": 0.5, "momentum": 0.9, "wd": 1e-3},
                            kvstore="device", update_on_kvstore=False)
    step = TrainStep(net, trainer, gluon.loss.SoftmaxCrossEntropyLoss(), ctx, 16, accumulate, clip)
    for _ in range(updates):
        x = mx.nd.array(rng.uniform(-1, 1, (16, 3, 12, 12)))
        y = mx.nd.array(rng.randint(0, 3, 16))
        out = step(x, y, y)
        assert len(out.outputs) == accumulate * len(ctx)
    return [p.data(ctx[-1]).asnumpy() for p in net.collect_params().values()], trainer.optimizer.num_update


@pytest.mark.parametrize("ctx", [[mx.cpu(0)], [mx.cpu(0), mx.cpu(1)]], ids=["1-device", "2-devices"])
def test_accumulating_micro_batches_equals_the_whole_batch(ctx):
    whole, whole_updates = _updates(1, ctx)
    for accumulate in (2, 4):
        parts, updates = _updates(accumulate, ctx)
        assert updates == whole_updates == 3  # one optimizer update (and schedule step) per batch
        for a, b in zip(whole, parts):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    initial = [p.data(ctx[-1]).asnumpy() for p in no_bn_net(ctx).collect_params().values()]
    assert not np.allclose(whole[0], initial[0])  # the updates did move the weights


def _linear_step(ctx, clip):
    """w . x as the loss of each image, x = (3, 4) for all: the mean gradient is (3, 4), norm 5."""
    net = gluon.nn.Dense(1, use_bias=False, in_units=2)
    net.initialize(mx.init.Zero(), ctx=ctx)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 1.0}, kvstore="device",
                            update_on_kvstore=False)
    step = TrainStep(net, trainer, lambda out, target: out.reshape((-1,)), ctx, 2 * len(ctx), clip_grad_norm=clip)
    x = mx.nd.array([[3.0, 4.0]] * (2 * len(ctx)))
    out = step(x, x[:, 0], x[:, 0])
    return net.weight.data(ctx[0]).asnumpy().ravel(), out.grad_norm


@pytest.mark.parametrize("ctx", [[mx.cpu(0)], [mx.cpu(0), mx.cpu(1)]], ids=["1-device", "2-devices"])
def test_clipping_scales_a_known_norm_to_exactly_the_limit_and_leaves_smaller_ones(ctx):
    w, norm = _linear_step(ctx, clip=1.0)
    np.testing.assert_allclose(w, [-0.6, -0.8], rtol=1e-6)  # the update is the gradient scaled to norm 1
    assert np.linalg.norm(w) == pytest.approx(1.0, rel=1e-6)
    assert norm.asnumpy()[0] == pytest.approx(5.0, rel=1e-6)  # the norm before clipping is what is logged
    w, norm = _linear_step(ctx, clip=10.0)
    np.testing.assert_allclose(w, [-3.0, -4.0], rtol=1e-6)  # below the limit: unchanged
    w_off, norm_off = _linear_step(ctx, clip=0.0)
    np.testing.assert_array_equal(w, w_off)
    assert norm_off is None


def test_accumulation_must_split_the_batch(colour_shards, tmp_path):
    with pytest.raises(UserError, match="does not split into --accumulate 3 micro-batches over 1 device"):
        plan_run(base_args(colour_shards, tmp_path / "run", "--accumulate", "3"))  # before MXNet loads
    with pytest.raises(UserError, match="do not split into --accumulate 3 micro-batches"):  # a worker's share
        from xception_mx.train import Trainer

        plan = plan_run(base_args(colour_shards, tmp_path / "run"))  # the trainer checks it again per worker
        Trainer(dataclasses.replace(plan, config=plan.config.replace(accumulate=3)))


def test_an_unwritable_tensorboard_folder_is_one_line(tmp_path):
    from xception_mx.board import Board

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"--tensorboard .*file/tb: cannot write event files there"):
        Board(str(blocker / "tb"))


def test_tensorboard_without_the_extra_is_one_line(tmp_path, monkeypatch):
    import xception_mx.board as board

    monkeypatch.setattr(board.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"--tensorboard needs the 'tensorboard' extra.*xception_mx\[tensorboard\]"):
        plan_run(["--output-dir", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")], check_data=False)


@pytest.mark.slow
def test_resume_in_the_middle_of_an_accumulating_run_is_bit_exact(colour_shards, tmp_path):
    args = ("--accumulate", "2", "--dropout", "0", "--ema", "0.7", "--log-interval", "1", "--clip-grad-norm", "0.5")
    straight = tmp_path / "straight"
    assert train_cli(base_args(colour_shards, straight, *args)).returncode == 0
    stopped = tmp_path / "stopped"
    proc = popen_train(base_args(colour_shards, stopped, *args))
    signal_at_line(proc, "epoch 2 [1/4]", signal.SIGTERM, timeout=180)
    proc.communicate(timeout=180)
    assert proc.returncode == 130
    partial = RunFolder(str(stopped), "xception_slim").partial_manifest()
    assert partial.in_progress.epoch == 2 and partial.progress.optimizer["num_update"] == 4 + \
        partial.in_progress.batches_done  # whole updates only: never between micro-batches
    resumed = train_cli(["--output-dir", str(stopped), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "grad-norm" in (stopped / "train.log").read_text()
    assert_same_states(straight, stopped, 2)


def read_events(folder):
    """(tag, step, value) of every scalar in ``folder``'s event files, oldest file first, with TensorBoard's purge
    rule applied (a SessionLog START at step P hides the earlier events at steps >= P); and the purge steps."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    scalars, purges = [], []
    for path in sorted(glob.glob(os.path.join(str(folder), "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.session_log.status == SessionLog.START:
                purges.append(event.step)
                scalars = [s for s in scalars if s[1] < event.step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.append((value.tag, event.step, value.simple_value))
    return scalars, purges


@pytest.mark.slow
def test_tensorboard_tags_and_steps_continue_across_a_resume(colour_shards, tmp_path):
    straight = tmp_path / "straight"
    assert train_cli(base_args(colour_shards, straight, "--tensorboard", str(straight / "tb"))).returncode == 0
    scalars, purges = read_events(straight / "tb")
    steps = {}
    for tag, step, _ in scalars:
        steps.setdefault(tag, []).append(step)
    # 4 updates an epoch, --log-interval 2: interval points at updates 2, 4, 6, 8; epoch points at 4 and 8.
    assert steps["train/loss"] == steps["train/top1"] == steps["train/lr"] == steps["train/img_per_sec"] == [2, 4, 6, 8]
    for tag in ("epoch/train_loss", "epoch/val_top1", "epoch/val_top5", "epoch/time_s", "epoch/epoch"):
        assert steps[tag] == [4, 8], tag
    assert "train/loss_scale" not in steps and purges == []
    # A crash after epoch 2 logged its points but before its checkpoint: resume from epoch 1.
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    RunFolder(str(crashed), "xception_slim").remove(2)
    time.sleep(1.1)  # event file names carry the second they were opened
    resumed = train_cli(["--output-dir", str(crashed), "--resume", "--tensorboard", str(crashed / "tb")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after, purges = read_events(crashed / "tb")
    assert purges == [5]  # the resumed writer hides what the crashed run logged after update 4
    assert sorted((tag, step) for tag, step, _ in after) == sorted((tag, step) for tag, step, _ in scalars)
    values = {(tag, step): v for tag, step, v in after}
    assert values[("epoch/epoch", 8)] == 2.0
