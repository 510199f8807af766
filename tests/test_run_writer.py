"""RunWriter: the documented order (a metrics line only once its checkpoint is complete), a lost metrics line
restored from its manifest, typed manifests that read old ones, and a writer for other ranks that writes nothing."""
import errno
import json
import os

import pytest

from xception_mx.errors import RunFailed
from xception_mx.manifest import EpochRecord, InProgress, Manifest, TrainProgress
from xception_mx.plan import plan_run
from xception_mx.runfolder import RunFolder


def _plan(out, *extra):
    return plan_run(["--output-dir", str(out), "--model", "xception_slim", "--num-epochs", "3", *extra],
                    environ={}, check_data=False)


def _state(epoch, best, in_progress=None):
    import mxnet as mx

    from xception_mx.writer import TrainState

    return TrainState({"param/w": mx.nd.array([1.0, 2.0, float(epoch)])},
                      TrainProgress(epoch, best, {"num_update": 4 * epoch}, None, in_progress))


def _record(epoch, top1):
    return EpochRecord(epoch, 0.1, 1.0, 0.5, 1.1, top1, 0.9, 100.0, 2.0)


def _net():
    import mxnet as mx
    from mxnet.gluon import nn

    net = nn.HybridSequential()
    net.add(nn.Dense(2))
    net.initialize()
    net.hybridize()
    net(mx.nd.ones((1, 3)))
    return net


def _lines(folder: RunFolder) -> list[int]:
    if not os.path.exists(folder.metrics):
        return []
    return [json.loads(line)["epoch"] for line in open(folder.metrics)]


def test_an_epoch_gets_its_metrics_line_after_its_checkpoint_and_a_lost_line_comes_back(tmp_path):
    from xception_mx.writer import RunWriter

    writer = RunWriter(_plan(tmp_path / "run"))
    with writer.claim():
        writer.start(0)
        first = _record(1, 0.4)
        writer.export(1, _net())
        writer.save_epoch(_state(1, first), first)
    folder = writer.folder
    assert folder.epochs() == [1] and _lines(folder) == [1]
    manifest = folder.manifest(1)
    assert manifest.metrics == first and manifest.progress.best == first and manifest.files.crc32
    assert json.loads(open(folder.best).read())["val_top1"] == 0.4
    os.remove(folder.metrics)  # as if killed between the manifest and the metrics line

    resumed = RunWriter(_plan(tmp_path / "run", "--resume"))
    with resumed.claim():
        resumed.start(4)
    assert _lines(folder) == [1]


def test_disk_full_while_saving_the_state_leaves_no_metrics_line(tmp_path, monkeypatch):
    from xception_mx import writer as writer_module

    writer = writer_module.RunWriter(_plan(tmp_path / "run"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "save_state", full)
    with writer.claim():
        writer.start(0)
        writer.export(1, _net())
        with pytest.raises(RunFailed, match="disk full"):
            writer.save_epoch(_state(1, _record(1, 0.4)), _record(1, 0.4))
    assert writer.folder.epochs() == [] and _lines(writer.folder) == []


def test_a_recovery_checkpoint_is_a_resumable_mid_epoch_manifest(tmp_path):
    from xception_mx.writer import RunWriter

    writer = RunWriter(_plan(tmp_path / "run"))
    with writer.claim():
        writer.start(0)
        writer.save_recovery(_state(0, None, InProgress(1, 3, {"count": 12}, 0.05, 7.5)))
    partial = writer.folder.partial_manifest()
    assert partial is not None and partial.in_progress == InProgress(1, 3, {"count": 12}, 0.05, 7.5)
    assert _plan(tmp_path / "run", "--resume").resume.partial


def test_other_ranks_write_nothing(tmp_path):
    from xception_mx.writer import make_writer

    writer = make_writer(_plan(tmp_path / "run"), rank=1)
    with writer.claim():
        writer.start(0)
        writer.save_recovery(_state(0, None, InProgress(1, 3)))
        writer.export(1, _net())
        writer.save_epoch(_state(1, _record(1, 0.4)), _record(1, 0.4))
    assert os.listdir(tmp_path / "run") == [] and writer.log_file.endswith("train.rank1.log")


def test_manifests_written_before_the_typed_records_read_back():
    old = {"format": 1, "epoch": 0, "best": {"epoch": None, "val_top1": None}, "optimizer": {"num_update": 3},
           "config": {"lr": 0.1}, "schedule": {"start_epoch": 0, "lr": 0.1, "warmup_epochs": 0},
           "in_progress": {"epoch": 1, "batches_done": 3, "acc": {}, "first_lr": 0.1, "elapsed": 1.0},
           "files": {"state_size": 10, "state_crc32": 5, "token": "ab"}, "metrics": None}
    manifest = Manifest.from_json(old)
    assert manifest.progress.best is None and manifest.in_progress == InProgress(1, 3, {}, 0.1, 1.0)
    assert manifest.files.token == "ab" and manifest.schedule.start_epoch == 0
    again = manifest.to_json()
    assert {k: again[k] for k in ("epoch", "optimizer", "config", "in_progress", "files")} == \
        {k: old[k] for k in ("epoch", "optimizer", "config", "in_progress", "files")}
    assert Manifest.from_json(again) == manifest
