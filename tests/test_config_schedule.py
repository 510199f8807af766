"""Config resolution (defaults < YAML < flags, one-line errors) and learning-rate schedules."""
import math

import pytest

from xception_mx.config import build_parser, load_yaml, resolve
from xception_mx.errors import UserError
from xception_mx.schedule import build_lr_scheduler


def parse(argv):
    return {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "config"}


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch-size: 64\nlr: 0.2\nfilter_list: [8, 8, 16, 16, 24, 24, 32]\nmirror: false\n")
    config = resolve(load_yaml(str(cfg)), parse(["--lr", "0.01", "--gpus", "0,1"]))
    assert config.batch_size == 64 and config.lr == 0.01 and config.gpus == (0, 1)
    assert config.filter_list == (8, 8, 16, 16, 24, 24, 32) and config.mirror is False
    assert config.wd == 1e-5  # untouched default


@pytest.mark.parametrize("yaml_text, fragment", [
    ("lr_decy: 0.9\n", "unknown key 'lr_decy' (did you mean 'lr_decay'?)"),
    ("batch_size: 1.5\n", "batch_size must be an integer"),
    ("mirror: maybe\n", "mirror must be true or false"),
    ("optimizer: lamb\n", "optimizer must be one of sgd, nag, rmsprop, adam"),
    ("filter_list: [1, 2, 3]\n", "filter_list must be 7 positive integers"),
    ("mean: [1, 2]\n", "mean needs 3 values"),
    ("- a\n- b\n", "must be a mapping"),
    ("lr: [\n", "not valid YAML"),
    ("prefix: ../x\n", "prefix must be a plain file name"),
    ("prefix: runs/x\n", "prefix must be a plain file name"),
])
def test_bad_yaml_is_one_line(tmp_path, yaml_text, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(UserError) as info:
        resolve(load_yaml(str(cfg)))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_retrain_needs_an_epoch():
    with pytest.raises(UserError, match="--retrain needs --model-load-epoch"):
        resolve({}, parse(["--retrain", "--lr", "0.1"]))


def test_shipped_configs_resolve():
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "configs", "*.yaml")))
    assert len(paths) >= 4
    for path in paths:
        resolve(load_yaml(path))
    paper = resolve(load_yaml(os.path.join(root, "configs", "xception_imagenet.yaml")))
    assert (paper.optimizer, paper.momentum, paper.lr, paper.lr_mode, paper.lr_decay,
            paper.lr_decay_period, paper.wd, paper.dropout, paper.input_size) == \
        ("sgd", 0.9, 0.045, "exp", 0.94, 2, 1e-5, 0.5, 299)
    assert paper.ema > 0


def lrs(scheduler, iters, epochs):
    """The lr of the first step of each epoch (MXNet's num_update starts at 1)."""
    return [scheduler(1 + e * iters) for e in range(epochs)]


def test_exp_schedule_is_the_papers():
    s = build_lr_scheduler("exp", 0.045, 6, 10, decay=0.94, decay_period=2)
    assert lrs(s, 10, 6) == pytest.approx([0.045, 0.045, 0.045 * 0.94, 0.045 * 0.94, 0.045 * 0.94 ** 2,
                                           0.045 * 0.94 ** 2])


def test_cosine_with_warmup_and_a_retrain_offset():
    s = build_lr_scheduler("cosine", 0.1, 5, 4, warmup_epochs=1, warmup_lr=0.01)
    first = lrs(s, 4, 5)
    assert first[0] == pytest.approx(0.01) and first[1] == pytest.approx(0.1)
    assert first[2] == pytest.approx(0.1 * (1 + math.cos(math.pi * 4 / 15)) / 2)
    retrain = build_lr_scheduler("cosine", 0.02, 5, 4, start_epoch=3)
    assert retrain(1 + 3 * 4) == pytest.approx(0.02)  # the first step after epoch 3 uses exactly the new lr
    assert retrain(5 * 4) == pytest.approx(0.0)


def test_step_epochs_are_absolute():
    s = build_lr_scheduler("step", 0.1, 6, 2, step_epochs=[2, 4], decay=0.1, warmup_epochs=1)
    assert lrs(s, 2, 6) == pytest.approx([0.0, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize("mode", ["cosine", "poly", "exp"])
def test_a_one_step_schedule_does_not_divide_by_zero(mode):
    """Regression test of the dmlc/gluon-cv#1421 workaround: one batch per epoch, one epoch (and one warm-up)."""
    assert build_lr_scheduler(mode, 0.05, 1, 1)(1) == pytest.approx(0.05)
    warm = build_lr_scheduler(mode, 0.05, 2, 1, warmup_epochs=1, warmup_lr=0.01)
    assert [warm(1), warm(2)] == pytest.approx([0.01, 0.05])
