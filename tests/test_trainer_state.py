"""Trainer.state() and restore() are one symmetric pair: state -> restore into a fresh Trainer -> state, bit for bit."""
import os
import signal

import numpy as np
import pytest

from helpers import base_args
from xception_mx.plan import plan_run
from xception_mx.train import Trainer


class _StopAfterFirstBatch:
    """Stands in for StopFlag: a signal 'arrives' before the first step, so the epoch stops after one batch."""
    signum = signal.SIGTERM
    name = "SIGTERM"


def _trainer(shards, out, *extra):
    return Trainer(plan_run(base_args(shards, out, "--num-epochs", "3", *extra)))


def _assert_same(a, b):
    assert sorted(a.arrays) == sorted(b.arrays)
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key].asnumpy(), b.arrays[key].asnumpy(), err_msg=key)
    assert a.progress == b.progress


@pytest.mark.parametrize("ema", ["0", "0.8"])
@pytest.mark.parametrize("where", ["epoch_boundary", "mid_epoch"])
def test_state_restore_state_round_trip_is_bit_exact(colour_shards, tmp_path, ema, where):
    trainer = _trainer(colour_shards, tmp_path / "a", "--ema", ema, "--optimizer", "adam", "--lr", "0.002")
    os.makedirs(trainer.folder.folder)
    trainer.writer.start(0)
    if where == "epoch_boundary":
        trainer._finish_epoch(1, trainer.train_epoch(1, stop=type("NoStop", (), {"signum": None})()).record)
    else:
        result = trainer.train_epoch(1, stop=_StopAfterFirstBatch())
        assert result.interrupted and result.in_progress.batches_done == 1
        trainer.in_progress = result.in_progress
    first = trainer.state()
    assert first.progress.epoch == (1 if where == "epoch_boundary" else 0)
    assert (first.progress.in_progress is not None) == (where == "mid_epoch")
    assert any(k.startswith("optim/") for k in first.arrays)
    assert any(k.startswith("ema/") for k in first.arrays) == (ema != "0")

    fresh = _trainer(colour_shards, tmp_path / "b", "--ema", ema, "--optimizer", "adam", "--lr", "0.002")
    before = fresh.state()
    fresh.restore(first)
    _assert_same(first, fresh.state())
    # The fresh trainer really changed: its initial weights and counters were not the trained ones.
    assert before.progress.optimizer["num_update"] != first.progress.optimizer["num_update"]
