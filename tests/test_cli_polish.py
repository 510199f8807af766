"""The command lines' shared polish: training's --help in groups with every fixed set of values, --version on every
console script (the trainer's without loading MXNet), "did you mean" for a misspelt flag, ``im2rec-tools build``,
and a folder of images given where shards are expected."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig

import pytest

import xception_mx
from helpers import ROOT
from im2rec_tools.__main__ import build_parser as im2rec_parser
from im2rec_tools.__main__ import main as im2rec_main
from shard_factory import write_tree
from xception_mx import records
from xception_mx.config import SCHEMA, build_parser, resolve
from xception_mx.console import did_you_mean
from xception_mx.errors import UserError
from xception_mx.plan import plan_run
from xception_mx.runfolder import RunFolder

SCRIPTS = sysconfig.get_path("scripts")
CONSOLE = ["train-xception", "xception-score", "xception-deploy", "xception-summary", "xception-convert",
           "im2rec-tools"]


def _groups(help_text: str) -> dict[str, list[str]]:
    """{group title: the flags listed under it} of an argparse help text."""
    groups: dict[str, list[str]] = {}
    title = None
    for line in help_text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            groups[title] = []
        elif title is not None and line.startswith("  -"):
            groups[title] += re.findall(r"(--[\w-]+)", line.split("  ")[1])
    return groups


def test_training_help_lists_every_key_in_its_group_in_order():
    groups = _groups(build_parser("train-xception").format_help())
    titles = [t for t in groups if t != "options"]
    assert titles == ["data", "augmentation and regularisation", "model", "devices and precision", "optimizer",
                      "schedule", "run folder and checkpoints", "resume, retrain and fine-tuning",
                      "reproducibility and debugging"]
    assert groups["options"] == ["--help", "--version", "--config"]
    for opt in SCHEMA:
        assert "--" + opt.name.replace("_", "-") in groups[opt.group], opt.name
    assert "--lr-mode" in groups["schedule"] and "--keep-last" in groups["run folder and checkpoints"]


def test_training_help_shows_the_allowed_values_from_where_they_are_checked():
    text = " ".join(build_parser().format_help().split())
    for opt in SCHEMA:
        if opt.choices:
            assert f"--{opt.name.replace('_', '-')} {{{','.join(opt.choices)}}}" in text, opt.name
    assert "--model {xception,xception_slim,xception41,xception65,xception71}" in text
    assert "--amp {off,bfloat16,float16}" in text and "--channel-multiple {auto,N}" in text
    assert "--resume [EPOCH]" in text


def test_the_model_names_are_the_registry_s():
    from xception_mx.registry import list_models

    assert list(next(o for o in SCHEMA if o.name == "model").choices) == list_models()


def test_a_misspelt_model_is_refused_before_mxnet_with_the_closest_name():
    with pytest.raises(UserError, match=r"model must be one of xception, .*got 'xceptoin' \(did you mean xception\?\)"):
        resolve({"model": "xceptoin"})


def test_unset_flags_stay_absent():
    assert vars(build_parser().parse_args([])) == {}
    assert vars(build_parser().parse_args(["--lr-mode", "cosine", "--resume"])) == {"lr_mode": "cosine", "resume": 0}


@pytest.mark.parametrize("argv, line", [
    (["--lr-mod", "cosine"], "unrecognized arguments: --lr-mod cosine (did you mean --lr-mode?)"),
    (["--lr-mod=cosine", "--num-epoch", "3"],
     "unrecognized arguments: --lr-mod=cosine --num-epoch 3 (did you mean --lr-mode, --num-epochs?)"),
    (["--zzzzzz"], "unrecognized arguments: --zzzzzz (see train-xception --help)"),
])
def test_a_misspelt_training_flag_names_the_closest_one(argv, line):
    with pytest.raises(UserError) as caught:
        build_parser("train-xception").parse_args(argv)
    assert str(caught.value) == line


def test_a_misspelt_sub_command_flag_is_matched_against_that_sub_command():
    parser = im2rec_parser()
    with pytest.raises(UserError, match=r"--val-ratoi 0.2 \(did you mean --val-ratio\?\)$"):
        parser.parse_args(["make-list", "a", "b", "--val-ratoi", "0.2"])
    with pytest.raises(UserError, match=r"--shard 2 \(see .* verify --help\)$"):  # pack's --shards is not verify's
        parser.parse_args(["verify", "x", "--shard", "2"])
    with pytest.raises(UserError, match=r"invalid choice: 'mak-list' .* \(did you mean make-list\?\)$"):
        parser.parse_args(["mak-list"])


def test_did_you_mean_says_nothing_when_nothing_is_close():
    assert did_you_mean(["--qqq"], ["--lr-mode"]) == ""
    assert did_you_mean(["--lr-mod", "--qqq"], ["--lr-mode", "--seed"]) == " (did you mean --lr-mode?)"


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("script", CONSOLE)
def test_every_console_script_prints_its_version(script):
    out = _run(os.path.join(SCRIPTS, script), "--version")
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == f"{script} {xception_mx.__version__} (mxnet 1.9.1)\n"


def test_the_launcher_prints_its_version():
    out = _run(sys.executable, "-m", "xception_mx.launch", "--version")
    line = f"python -m xception_mx.launch {xception_mx.__version__} (mxnet 1.9.1)\n"
    assert (out.returncode, out.stdout) == (0, line)


def test_the_trainer_s_version_does_not_load_mxnet():
    script = ("import sys\nfrom xception_mx.cli import train_main\n"
              "try:\n    train_main(['--version'])\nexcept SystemExit as exc:\n"
              "    print(exc.code, 'mxnet' in sys.modules)\n")
    out = _run(sys.executable, "-c", script)
    assert out.stdout.splitlines()[-1] == "0 False", out.stderr


def test_sub_commands_have_no_version_of_their_own():
    parser = im2rec_parser()
    assert "--version" in parser.format_help()
    assert "--version" not in parser.commands.choices["pack"].format_help()


@pytest.fixture()
def image_tree(tmp_path):
    write_tree(str(tmp_path / "imgs"), ["cats", "dogs", "owls"], 10)
    return tmp_path / "imgs"


def test_build_makes_verified_shards_the_trainer_takes(image_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    code = im2rec_main(["build", str(image_tree), str(out), "--val-ratio", "0.2", "--shards", "2", "--workers", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert sorted(p for p in os.listdir(out) if not p.endswith((".idx", ".crc"))) == [
        "classes.txt", "train-00000-of-00002.rec", "train-00001-of-00002.rec", "train.lst", "val-00000-of-00001.rec",
        "val.lst"]
    assert "wrote " + str(out / "val.lst") + ": 6 images" in printed and "\nOK\n" in printed
    assert printed.splitlines()[-1].strip().endswith(f"--data-dir {out} --model xception --output-dir runs/shards")
    plan = plan_run(["--data-dir", str(out), "--output-dir", str(tmp_path / "run")], environ={})
    assert plan.config.num_classes == 3 and len(plan.shards.train) == 2
    # Run again: the complete shards are left alone.
    assert im2rec_main(["build", str(image_tree), str(out), "--val-ratio", "0.2", "--shards", "2"]) == 0
    assert "(0 built, 2 left alone)" in capsys.readouterr().out


def test_build_takes_the_flags_of_make_list_and_pack():
    commands = im2rec_parser().commands.choices
    flags = {name: set(parser.flags()) for name, parser in commands.items()}
    assert flags["make-list"] <= flags["build"]
    assert flags["pack"] - {"--image-root"} <= flags["build"]


@pytest.mark.parametrize("argv, needle", [
    (["--val-ratio", "0"], "--val-ratio 0 holds out no images"),
    (["--val-ratio", "0.01"], "--val-ratio 0.01 held out no image"),
])
def test_build_refuses_a_split_without_validation_images(image_tree, tmp_path, capsys, argv, needle):
    assert im2rec_main(["build", str(image_tree), str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_data_dir_of_images_names_the_build_command(image_tree, tmp_path):
    with pytest.raises(UserError) as caught:
        plan_run(["--data-dir", str(image_tree), "--output-dir", str(tmp_path / "run")], environ={})
    assert str(caught.value) == (f"--data-dir {image_tree} holds images, not RecordIO shards: run python -m "
                                 f"im2rec_tools build {image_tree} {image_tree}_shards --val-ratio 0.1 and train on "
                                 f"{image_tree}_shards (--data-dir {image_tree}_shards)")
    with pytest.raises(UserError, match=r"holds images, not RecordIO shards: pack them with .* build "):
        records.find_shards(str(image_tree))  # xception-score --rec IMAGES


def test_a_data_dir_with_shards_beside_its_images_is_taken(image_tree, tmp_path):
    out = tmp_path / "data"
    assert im2rec_main(["build", str(image_tree), str(out), "--val-ratio", "0.2"]) == 0
    os.rename(image_tree, out / "images")  # demo-digits' layout: the images beside the shards
    records.refuse_image_folder(str(out), "--data-dir")
    assert plan_run(["--data-dir", str(out), "--output-dir", str(tmp_path / "run")], environ={}).shards.val


def test_keep_last_prunes_old_epochs_but_never_the_best(tmp_path):
    folder = RunFolder(str(tmp_path), "m")
    for epoch in range(1, 6):
        files = folder.files(epoch)
        for path in (files.symbol, files.export, files.state, files.manifest):
            open(path, "w").close()
        folder.prune(epoch, 2, best_epoch=1)
    assert folder.epochs() == [1, 4, 5]
    folder.prune(5, 2, best_epoch=4)  # a newer best: the old one goes
    assert folder.epochs() == [4, 5]


def test_a_data_dir_without_images_or_shards_keeps_the_no_shards_line(tmp_path):
    (tmp_path / "data" / "notes").mkdir(parents=True)
    (tmp_path / "data" / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no shards for prefix"):
        plan_run(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run")], environ={})


def test_a_closed_stdout_stops_quietly_with_exit_1():
    """`xception-score predict FOLDER | head -2`: the reader goes away; one-line errors are for the user's mistakes,
    so nothing is printed (as shell tools do) and the exit code is 1."""
    code = ("import sys\nfrom xception_mx.console import run_cli\n"
            "def body():\n    raise BrokenPipeError(32, 'Broken pipe')\n"
            "sys.exit(run_cli('score.py', body))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, "")
