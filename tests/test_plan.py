"""plan_run: the resume / retrain / config-edit matrix, the engine choice and the run-level checks, without MXNet.

Run folders here are made by hand (manifests as the trainer writes them, empty stand-ins for the arrays), so the
rules are tested without training; the trainer tests check that the same rules hold end to end.
"""
import json
import os
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT
from xception_mx.errors import UserError
from xception_mx.manifest import Manifest, ScheduleOrigin
from xception_mx.plan import plan_run
from xception_mx.runfolder import RunFolder

SAVED = {"model": "xception_slim", "lr": 0.05, "lr_mode": "cosine", "batch_size": 16, "num_epochs": 4,
         "optimizer": "nag", "warmup_epochs": 1, "seed": 3, "num_classes": 4}


def make_run(folder, epochs=(1, 2), partial_after=None, prefix="xception_slim", config=None, schedule=None):
    """A run folder whose checkpoints look complete to RunFolder (manifest + state + export + symbol)."""
    os.makedirs(folder, exist_ok=True)
    run = RunFolder(str(folder), prefix)
    config = {**SAVED, **(config or {}), "output_dir": str(folder), "resume": None, "retrain": False,
              "model_load_epoch": None}
    schedule = schedule or {"start_epoch": 0, "lr": config["lr"], "warmup_epochs": config["warmup_epochs"]}
    for epoch in [*epochs, *([None] if partial_after is not None else [])]:
        files = run.files(epoch)
        for path in (files.symbol, files.export, files.state):
            open(path, "wb").close()
        manifest = {"format": 1, "epoch": partial_after if epoch is None else epoch, "config": config,
                    "schedule": schedule, "optimizer": {}, "best": None}
        if epoch is None:
            manifest["in_progress"] = {"epoch": partial_after + 1, "batches_done": 2}
        run.write_manifest(epoch, Manifest.from_json(manifest))
    return run


def plan(*argv, **kwargs):
    return plan_run(list(argv), environ=kwargs.pop("environ", {}), check_data=False)


def test_fresh_run_takes_the_file_then_the_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"lr": 0.2, "batch_size": 64, "model": "xception_slim", "warmup_epochs": 2}))
    p = plan("--config", str(cfg), "--lr", "0.1", "--output-dir", str(tmp_path / "run"))
    assert p.resume is None and not p.retrain and p.start_epoch == 0
    assert (p.config.lr, p.config.batch_size) == (0.1, 64)
    assert p.schedule == ScheduleOrigin(0, 0.1, 2)
    assert p.folder.prefix == "xception_slim" and p.engine == "NaiveEngine"


def test_resume_with_only_the_folder_continues_the_saved_run(tmp_path):
    make_run(tmp_path / "run", epochs=(1, 2))
    p = plan("--output-dir", str(tmp_path / "run"), "--resume")
    assert p.resume.epoch == 2 and not p.resume.partial and not p.retrain
    assert {k: getattr(p.config, k) for k in SAVED} == SAVED  # model, schedule, batch: the manifest's
    assert p.schedule == ScheduleOrigin(0, 0.05, 1)
    assert p.folder.prefix == "xception_slim"  # found in the folder, not the default model's name


def test_resume_takes_the_mid_epoch_checkpoint_after_the_latest_epoch(tmp_path):
    make_run(tmp_path / "run", epochs=(1,), partial_after=1)
    p = plan("--output-dir", str(tmp_path / "run"), "--resume")
    assert p.resume.partial and p.resume.epoch == 1
    assert p.resume.manifest.in_progress.batches_done == 2
    older = plan("--output-dir", str(tmp_path / "run"), "--resume", "1")  # an explicit epoch: the epoch itself
    assert not older.resume.partial and older.resume.epoch == 1


def test_model_load_epoch_alone_is_a_resume_of_that_epoch(tmp_path):
    make_run(tmp_path / "run", epochs=(1, 2))
    p = plan("--output-dir", str(tmp_path / "run"), "--model-load-epoch", "1")
    assert p.resume.epoch == 1 and not p.retrain and p.schedule.start_epoch == 0


def test_model_load_epoch_takes_best_and_last_from_the_run_folder(tmp_path):
    make_run(tmp_path / "run", epochs=(1, 2, 3))
    with pytest.raises(UserError, match=r"--model-load-epoch best: no best.json in .*: give --model-load-epoch last"):
        plan("--output-dir", str(tmp_path / "run"), "--retrain", "--model-load-epoch", "best", "--lr", "0.01")
    (tmp_path / "run" / "best.json").write_text('{"epoch": 2, "val_top1": 0.9}')
    best = plan("--output-dir", str(tmp_path / "run"), "--retrain", "--model-load-epoch", "best", "--lr", "0.01")
    assert best.retrain and best.resume.epoch == 2 and best.config.model_load_epoch == 2
    assert plan("--output-dir", str(tmp_path / "run"), "--model-load-epoch", "last").resume.epoch == 3
    with pytest.raises(UserError, match="--model-load-epoch last: .* holds no complete checkpoint"):
        plan("--output-dir", str(tmp_path / "empty"), "--model-load-epoch", "last")
    with pytest.raises(UserError, match=r"a number, best or last, got 'bset' \(did you mean best\?\)"):
        plan("--output-dir", str(tmp_path / "run"), "--model-load-epoch", "bset")


def test_retrain_starts_a_new_schedule_on_the_saved_config(tmp_path):
    make_run(tmp_path / "run", epochs=(1, 2))
    p = plan("--output-dir", str(tmp_path / "run"), "--retrain", "--model-load-epoch", "1", "--lr", "0.007",
             "--batch-size", "32")
    assert p.retrain and p.resume.epoch == 1
    assert p.schedule == ScheduleOrigin(1, 0.007, 0)
    assert p.config.lr_mode == "cosine" and p.config.batch_size == 32 and p.config.seed == 3


def test_a_retrained_run_resumes_with_the_printed_command(tmp_path):
    """The saved config of a retrain says retrain: true; a resume must not inherit it (nor its epoch)."""
    branch = {"start_epoch": 1, "lr": 0.007, "warmup_epochs": 0}
    make_run(tmp_path / "run", epochs=(1, 2), schedule=branch, config={"lr": 0.007})
    manifest_path = RunFolder(str(tmp_path / "run"), "xception_slim").files(2).manifest
    manifest = json.load(open(manifest_path))
    manifest["config"].update(retrain=True, model_load_epoch=1)
    json.dump(manifest, open(manifest_path, "w"))
    p = plan("--output-dir", str(tmp_path / "run"), "--resume")
    assert p.resume.epoch == 2 and not p.retrain and p.schedule == ScheduleOrigin.from_dict(branch)


@pytest.mark.parametrize("argv, fragment", [
    (["--lr", "0.5"], "--lr with --resume"),
    (["--lr-mode", "exp"], "--lr-mode with --resume"),
    (["--batch-size", "32"], "--batch-size with --resume"),
    (["--amp", "bfloat16"], "--amp with --resume"),
    (["--accumulate", "2"], "--accumulate with --resume"),
])
def test_resume_refuses_a_new_schedule_from_a_flag(tmp_path, argv, fragment):
    make_run(tmp_path / "run")
    with pytest.raises(UserError) as info:
        plan("--output-dir", str(tmp_path / "run"), "--resume", *argv)
    assert fragment in str(info.value) and "--retrain --model-load-epoch N" in str(info.value)


@pytest.mark.parametrize("key, value", [("lr_mode", "exp"), ("batch_size", 32), ("warmup_epochs", 0)])
def test_resume_refuses_a_new_schedule_from_an_edited_config_file(tmp_path, key, value):
    make_run(tmp_path / "run")
    cfg = tmp_path / "edited.yaml"
    cfg.write_text(yaml.safe_dump({**SAVED, key: value, "output_dir": str(tmp_path / "run")}))
    with pytest.raises(UserError) as info:
        plan("--config", str(cfg), "--resume")
    assert f"{key}: {value!r} in {cfg} with --resume" in str(info.value)


def test_resume_accepts_unchanged_values_more_epochs_and_other_devices(tmp_path):
    make_run(tmp_path / "run")
    cfg = tmp_path / "same.yaml"
    cfg.write_text(yaml.safe_dump({**SAVED, "output_dir": str(tmp_path / "run")}))
    p = plan("--config", str(cfg), "--resume", "--lr", "0.05", "--num-epochs", "9", "--cpus", "2")
    assert p.config.num_epochs == 9 and p.config.cpus == 2 and p.resume.epoch == 2


@pytest.mark.parametrize("setup, argv, fragment", [
    ("run", ["--num-epochs", "2"], "the checkpoint is at epoch 2 and num_epochs is 2"),
    ("empty", [], "holds no complete checkpoint"),
    ("run", ["--resume", "7"], "epochs that exist: 1, 2"),
    ("two_prefixes", [], "holds checkpoints of 2 prefixes (a, b): pass --prefix"),
])
def test_resume_errors_are_one_line(tmp_path, setup, argv, fragment):
    folder = tmp_path / "run"
    if setup == "run":
        make_run(folder)
    elif setup == "two_prefixes":
        make_run(folder, prefix="a")
        make_run(folder, prefix="b")
    else:
        folder.mkdir()
    argv = argv if "--resume" in argv else ["--resume", *argv]
    with pytest.raises(UserError) as info:
        plan("--output-dir", str(folder), *argv)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    make_run(tmp_path / "run", epochs=(1,))
    with pytest.raises(UserError, match=r"already holds checkpoints \(epochs 1..1\): pass --resume"):
        plan("--output-dir", str(tmp_path / "run"), "--model", "xception_slim")


@pytest.mark.parametrize("argv, environ, engine", [
    ([], {}, "NaiveEngine"),
    (["--deterministic", "off"], {}, "ThreadedEnginePerDevice"),
    (["--kv-store", "dist_sync"], {}, "ThreadedEnginePerDevice"),
    ([], {"MXNET_ENGINE_TYPE": "ThreadedEngine"}, "ThreadedEngine"),  # the user's choice is kept
])
def test_engine_choice(tmp_path, argv, environ, engine):
    assert plan("--output-dir", str(tmp_path / "run"), *argv, environ=environ).engine == engine


@pytest.mark.parametrize("argv, fragment", [
    (["--cpus", "3"], "not divisible by the 3 devices"),
    (["--amp", "float16"], "--amp float16 needs GPUs"),
    (["--amp", "bfloat16", "--gpus", "0"], "on GPUs use --amp float16"),
    (["--dtype", "float16"], "dtype was replaced by amp: use --amp float16"),
])
def test_device_checks_run_before_anything_is_built(tmp_path, argv, fragment):
    with pytest.raises(UserError, match=fragment):
        plan("--output-dir", str(tmp_path / "run"), *argv)


def test_bfloat16_needs_the_cpu_instructions(tmp_path, monkeypatch):
    import xception_mx.plan as plan_module

    monkeypatch.setattr(plan_module, "cpu_flags", lambda: {"avx2", "avx512f"})
    with pytest.raises(UserError, match="lacks bfloat16 instructions .* --amp off"):
        plan("--output-dir", str(tmp_path / "run"), "--amp", "bfloat16")
    monkeypatch.setattr(plan_module, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert plan("--output-dir", str(tmp_path / "run"), "--amp", "bfloat16").config.amp == "bfloat16"


def test_a_retrain_may_switch_precision_and_an_old_dtype_key_is_read(tmp_path, monkeypatch):
    import xception_mx.plan as plan_module

    monkeypatch.setattr(plan_module, "cpu_flags", lambda: {"avx512_bf16"})
    make_run(tmp_path / "run", config={"dtype": "float32"})  # a run saved before --amp existed
    assert plan("--output-dir", str(tmp_path / "run"), "--resume").config.amp == "off"
    p = plan("--output-dir", str(tmp_path / "run"), "--retrain", "--model-load-epoch", "2", "--lr", "0.01",
             "--amp", "bfloat16")
    assert p.retrain and p.config.amp == "bfloat16"


def test_shards_and_record_headers_are_checked_in_the_plan(colour_shards, tmp_path):
    p = plan_run(["--train-rec", str(colour_shards / "train"), "--val-rec", str(colour_shards / "val"),
                  "--output-dir", str(tmp_path / "run")], environ={})
    assert len(p.shards.train) == 2 and len(p.shards.val) == 1
    with pytest.raises(UserError, match="no val data"):
        plan_run(["--train-rec", str(colour_shards / "train"), "--output-dir", str(tmp_path / "run")], environ={})


def test_planning_a_resume_parses_once_and_imports_no_mxnet(tmp_path):
    make_run(tmp_path / "run")
    script = (
        "import sys, argparse\n"
        "calls = []\n"
        "real = argparse.ArgumentParser.parse_args\n"
        "def counting(self, *a, **k):\n"
        "    calls.append(self.prog)\n"
        "    return real(self, *a, **k)\n"
        "argparse.ArgumentParser.parse_args = counting\n"
        "from xception_mx.plan import plan_run\n"
        f"p = plan_run(['--output-dir', {str(tmp_path / 'run')!r}, '--resume'], check_data=False)\n"
        "assert p.resume.epoch == 2\n"
        "print(len(calls), 'mxnet' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False"]


@pytest.mark.parametrize("classes_txt, given, expected, fragment", [
    (None, None, 4, "from the labels seen at start, 0..3"),
    (["a", "b", "c", "d", "e", "f"], None, 6, "classes.txt"),  # the shards use 4 of its 6 classes
    (["a", "b"], None, None, "names 2 classes but the shards hold label 3"),
    (None, "10", 10, "6 classes no image trains"),
])
def test_num_classes_comes_from_the_data_unless_given(colour_shards, tmp_path, classes_txt, given, expected,
                                                      fragment):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(colour_shards, shards)
    if classes_txt:
        (shards / "classes.txt").write_text("".join(f"{i}\t{name}\n" for i, name in enumerate(classes_txt)))
    argv = ["--train-rec", str(shards / "train"), "--val-rec", str(shards / "val"), "--output-dir",
            str(tmp_path / "run"), *(["--num-classes", given] if given else [])]
    if expected is None:
        with pytest.raises(UserError, match=fragment):
            plan_run(argv, environ={})
        return
    plan = plan_run(argv, environ={})
    assert plan.config.num_classes == expected
    assert any(fragment in note for note in plan.notes), plan.notes
