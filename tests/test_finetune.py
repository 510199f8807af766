"""Fine-tuning: --pretrained loads every feature weight, the classifier is new, freezing and lr multipliers hold."""
import numpy as np
import pytest

from helpers import base_args, run, state_params, train_cli
from xception_mx.finetune import read_weights

pytestmark = pytest.mark.slow  # every test uses the module's training run


@pytest.fixture(scope="module")
def pretrained(colour_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    run(base_args(colour_shards, out, "--num-epochs", "1"))
    return out / "xception_slim-0001.state.params"


def test_features_are_loaded_and_frozen_and_the_head_is_new(colour_shards, pretrained, tmp_path):
    out = tmp_path / "ft"
    run(base_args(colour_shards, out, "--num-epochs", "2", "--num-classes", "6", "--pretrained", str(pretrained),
                  "--freeze-features-epochs", "1", "--prefix", "ft"))
    source = read_weights(str(pretrained))
    epoch1, epoch2 = state_params(out, 1, "ft"), state_params(out, 2, "ft")
    trainable = [k[len("param/"):] for k in epoch1 if k.startswith("param/features.")
                 and not k.endswith(("running_mean", "running_var"))]
    assert len(trainable) > 50
    for name in trainable:  # frozen for epoch 1: exactly the pretrained values
        np.testing.assert_array_equal(epoch1["param/" + name], source[name].asnumpy(), err_msg=name)
    assert epoch1["param/fc.weight"].shape == (6, 32) != source["fc.weight"].shape
    assert not np.array_equal(epoch2["param/features.conv1.weight"], epoch1["param/features.conv1.weight"])


def test_features_lr_mult_zero_keeps_features(colour_shards, pretrained, tmp_path):
    out = tmp_path / "ft"
    run(base_args(colour_shards, out, "--num-epochs", "1", "--pretrained", str(pretrained),
                  "--features-lr-mult", "0"))
    source = read_weights(str(pretrained))
    after = state_params(out, 1)
    np.testing.assert_array_equal(after["param/features.block5.rep.1.pointwise.weight"],
                                  source["features.block5.rep.1.pointwise.weight"].asnumpy())
    assert not np.array_equal(after["param/fc.weight"], source["fc.weight"].asnumpy())


@pytest.mark.parametrize("case, fragment", [("missing", "no such file"), ("other_model", "the model has")])
def test_bad_pretrained_is_one_line(colour_shards, pretrained, tmp_path, case, fragment):
    args = base_args(colour_shards, tmp_path / "ft", "--num-epochs", "1")
    if case == "missing":
        args += ["--pretrained", str(tmp_path / "nothing")]
    else:
        args[args.index("--filter-list") + 1] = "8,8,16,16,24,24,48"
        args += ["--pretrained", str(pretrained)]
    result = train_cli(args)
    assert result.returncode == 2
    lines = [l for l in result.stderr.strip().splitlines() if l.strip() and not l.startswith("[")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
