"""Aligned Xception (xception41/65/71): registry data, parameter counts, timm weight import with logit parity, and
the trainer, scoring and export taking the new names unchanged."""
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from helpers import SIZES, TOLERANCE, base_args, ref_run, train_cli, write_inputs
from xception_mx import get_model, list_models
from xception_mx.aligned import block_table
from xception_mx.convert import build_pretrained, load_pretrained, main
from xception_mx.model import count_parameters
from xception_mx.registry import ALIGNED_CONFIGS

ALIGNED = ("xception41", "xception65", "xception71")
#: timm's model card: 26.97M, 39.92M, 42.34M parameters.
PUBLISHED_MILLIONS = {"xception41": 26.97, "xception65": 39.92, "xception71": 42.34}


def test_five_registered_names_and_variants_are_data():
    assert list_models() == ["xception", "xception_slim", "xception41", "xception65", "xception71"]
    counts = {name: len(block_table(**cfg)) for name, cfg in ALIGNED_CONFIGS.items()}
    assert counts == {"xception41": 13, "xception65": 21, "xception71": 23}
    table = block_table(**ALIGNED_CONFIGS["xception71"])
    assert [b.stride for b in table[:5]] == [2, 1, 2, 1, 2] and not table[-1].skip and not table[-1].relu_first


@pytest.mark.parametrize("name", ALIGNED)
def test_parameter_counts_round_to_the_published_figures(name):
    net = get_model(name)
    net.initialize()
    trainable, _ = count_parameters(net)
    assert round(trainable / 1e6, 2) == PUBLISHED_MILLIONS[name]


def test_filter_list_with_an_aligned_model_is_one_line(colour_shards, tmp_path):
    args = base_args(colour_shards, tmp_path / "run", "--num-epochs", "1")
    args[args.index("--model") + 1] = "xception41"
    result = train_cli(args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and "configured by its block table" in lines[0], result.stderr


@pytest.mark.slow
def test_trainer_score_and_export_take_an_aligned_name(colour_shards, tmp_path):
    out = tmp_path / "run"
    args = base_args(colour_shards, out, "--num-epochs", "1", "--max-batches", "1", "--input-size", "71",
                     "--batch-size", "4")
    args[args.index("--model") + 1] = "xception41"
    del args[args.index("--filter-list"):args.index("--filter-list") + 2]
    result = train_cli(args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training xception41 (aligned, 13 blocks)" in result.stdout
    assert (out / "xception41-symbol.json").is_file() and (out / "xception41-0001.params").is_file()
    scored = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "score.py"),
                             "--model-prefix", str(out / "xception41"), "--epoch", "1", "--rec",
                             str(colour_shards / "val"), "--json", str(tmp_path / "s.json")],
                            capture_output=True, text=True, timeout=240)
    assert scored.returncode == 0, scored.stderr
    assert json.loads((tmp_path / "s.json").read_text())["images"] == 22


@pytest.fixture(scope="module")
def aligned_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aligned_reference")
    inputs = write_inputs(folder, seed=7)
    return folder, json.loads(ref_run("ref_timm_aligned.py", str(folder), *inputs, timeout=1200))


@pytest.mark.parity
@pytest.mark.parametrize("name", ALIGNED)
def test_timm_weights_import_with_logit_parity(aligned_reference, tmp_path, name, capsys):
    folder, summary = aligned_reference
    ref = summary["variants"][name]
    prefix = str(tmp_path / name)
    assert main([str(folder / f"{name}.safetensors"), prefix]) == 0
    params, meta = load_pretrained(prefix)
    assert meta["model"] == {"name": name, "num_classes": 1000, "bn_epsilon": 1e-3}
    # timm's default config of the .tf_in1k weights is the protocol written beside the export.
    cfg = ref["config"]
    assert meta["preprocess"]["input_size"] == cfg["input_size"][1]
    assert meta["preprocess"]["crop_pct"] == cfg["crop_pct"]
    assert meta["preprocess"]["interpolation"] == cfg["interpolation"] == "bicubic"
    assert meta["preprocess"]["mean"] == [255 * m for m in cfg["mean"]]
    assert meta["preprocess"]["std"] == [255 * s for s in cfg["std"]]
    net = build_pretrained(prefix)
    assert count_parameters(net)[0] == ref["parameters"]  # timm's exact integer
    net.hybridize(static_alloc=True, static_shape=True)
    diffs = {}
    for size in SIZES:
        x = mx.nd.array(np.load(folder / f"{size}.npy"))
        theirs = np.load(folder / f"{size}.{name}.npy")
        assert np.abs(theirs).max() > 0.5, "reference logits too small to mean anything"
        diffs[size] = float(np.abs(net(x).asnumpy() - theirs).max())
    with capsys.disabled():
        print(f"\n{name} parity, max |logit diff|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parity
def test_an_aligned_file_with_a_missing_tensor_writes_nothing(aligned_reference, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder, _ = aligned_reference
    state = load_file(str(folder / "xception41.safetensors"))
    del state["blocks.4.stack.conv2.bn_pw.running_var"]
    bad = str(tmp_path / "bad.safetensors")
    save_file(state, bad)
    assert main([bad, str(tmp_path / "out" / "x")]) == 2
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
