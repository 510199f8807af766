"""xception_mx.summary: parameters per stage against count_parameters, MACs against an independent closed-form
count, the activation-memory rule on the stem, and the CLI (table, --json, one-line errors with exit 2).

Everything here is shape inference on symbols: no weights are initialised and no image is computed."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT
from xception_mx import get_model, list_models
from xception_mx.model import count_parameters
from xception_mx.registry import MODEL_CONFIGS
from xception_mx.summary import STAGES, layer_macs, main, summarize


@pytest.mark.parametrize("name", list_models())
def test_stage_parameters_sum_to_count_parameters(name):
    s = summarize(name, input_size=71, num_classes=7, batch_size=1)
    assert [stage.name for stage in s.stages] == list(STAGES)
    assert (s.params, s.total("params_total")) == count_parameters(get_model(name, num_classes=7))
    assert all(stage.params > 0 for stage in s.stages)
    assert s.stages[-1].output_shape == (7,)


def test_paper_model_stage_parameters_by_hand():
    stages = {st.name: st for st in summarize("xception", input_size=71).stages}
    # conv1 3x3 3->32, BN 32 (gamma, beta), conv2 3x3 32->64, BN 64
    assert stages["stem"].params == 27 * 32 + 2 * 32 + 9 * 32 * 64 + 2 * 64
    # eight blocks of three (depthwise 3x3 + pointwise 728x728 + BN)
    assert stages["middle"].params == 8 * 3 * (9 * 728 + 728 * 728 + 2 * 728)
    assert stages["head"].params == 2048 * 1000 + 1000


def test_layer_macs_by_formula():
    conv = {"kernel": "(3, 3)", "num_group": "1"}
    assert layer_macs("Convolution", conv, (1, 16, 10, 10), (1, 32, 8, 8)) == 32 * 8 * 8 * 16 * 9
    depthwise = {"kernel": "(3, 3)", "num_group": "16"}
    assert layer_macs("Convolution", depthwise, (1, 16, 10, 10), (1, 16, 10, 10)) == 16 * 10 * 10 * 9
    assert layer_macs("FullyConnected", {}, (1, 2048), (1, 1000)) == 2048 * 1000
    assert layer_macs("BatchNorm", {}, (1, 16, 4, 4), (1, 16, 4, 4)) == 0


def _paper_macs(f, size, classes):
    """MACs of the paper's network for a filter list, written from the architecture (not from the graph)."""
    def sep(cin, cout, h):
        return h * h * cin * 9 + h * h * cin * cout

    def block(cin, cout, reps, h, strided=True, grow_first=True):
        ins = [cin] + [cout if grow_first else cin] * (reps - 1)
        outs = [cout] * reps if grow_first else [cin] * (reps - 1) + [cout]
        h_out = (h - 1) // 2 + 1 if strided else h
        skip = h_out * h_out * cin * cout if strided or cin != cout else 0
        return sum(sep(i, o, h) for i, o in zip(ins, outs)) + skip, h_out

    h = (size - 3) // 2 + 1
    total = h * h * (f[0] // 2) * 27
    h -= 2
    total += h * h * f[0] * (f[0] // 2) * 9
    for cin, cout in ((f[0], f[1]), (f[1], f[2]), (f[2], f[3])):
        macs, h = block(cin, cout, 2, h)
        total += macs
    total += 8 * block(f[3], f[3], 3, h, strided=False)[0]
    macs, h = block(f[3], f[4], 2, h, grow_first=False)
    return total + macs + sep(f[4], f[5], h) + sep(f[5], f[6], h) + f[6] * classes


@pytest.mark.parametrize("name,size,classes", [("xception", 71, 10), ("xception", 100, 3),
                                               ("xception_slim", 88, 5), ("xception", 299, 1000)])
def test_paper_model_macs_match_an_independent_count(name, size, classes):
    s = summarize(name, input_size=size, num_classes=classes)
    assert s.macs == _paper_macs(MODEL_CONFIGS[name]["filter_list"], size, classes)
    assert sum(stage.macs for stage in s.stages) == s.macs


def test_xception_299_figures():
    s = summarize("xception")
    assert (s.params, s.macs) == (22_855_952, 8_357_403_496)
    assert round((s.macs + s.total("bn_ops")) / 1e9, 1) == 8.4  # timm's results table (fvcore counts BN)
    assert s.total("conv_outputs") == 35_825_968
    assert [st.output_shape for st in s.stages] == [(64, 147, 147), (728, 19, 19), (728, 19, 19), (2048, 10, 10),
                                                    (1000,)]


def test_activation_memory_of_the_stem_by_hand():
    # kept: the image (conv1's input), conv1's output (BN's input), ReLU's output (also conv2's input), conv2's
    # output, the second ReLU's output; float32, batch 4.
    stem = summarize("xception", input_size=71, batch_size=4).stages[0]
    assert stem.output_shape == (64, 33, 33)
    assert stem.activation_bytes == 4 * 4 * (3 * 71 * 71 + 2 * 32 * 35 * 35 + 2 * 64 * 33 * 33)
    one = summarize("xception41", input_size=71, batch_size=1)
    eight = summarize("xception41", input_size=71, batch_size=8)
    assert eight.activation_bytes == 8 * one.activation_bytes and eight.macs == one.macs


def test_cli_table_and_json(capsys):
    assert main(["xception_slim", "--input-size", "80", "--num-classes", "4", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("xception_slim: 80x80 input, 4 classes") and "total" in out and "middle" in out
    assert main(["xception65", "--input-size", "96", "--num-classes", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [st["name"] for st in data["stages"]] == list(STAGES)
    assert data["totals"]["params"] == count_parameters(get_model("xception65", num_classes=3))[0]
    assert data["totals"]["macs"] == sum(st["macs"] for st in data["stages"])
    assert data["stages"][-1]["output_shape"] == [3] and data["batch_size"] == 32


@pytest.mark.parametrize("argv,message", [
    (["xceptio"], "unknown model 'xceptio'; choose one of: xception, "),
    (["xception", "--input-size", "70"], "--input-size must be at least 71"),
    (["xception", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["xception", "--num-classes", "-3"], "--num-classes must be a positive integer, got -3"),
    (["xception", "--input-size", "big"], "argument --input-size: invalid int value: 'big'"),
    ([], "name one model, as MODEL or --model MODEL"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("python -m xception_mx.summary: error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_module_entry_point_unknown_model():
    proc = subprocess.run([sys.executable, "-m", "xception_mx.summary", "nope"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m xception_mx.summary: error: unknown model 'nope'")


def test_the_model_is_named_as_an_argument_or_as_the_trainer_spells_it(capsys):
    assert main(["xception_slim", "--input-size", "72", "--json"]) == 0
    positional = json.loads(capsys.readouterr().out)
    assert main(["--model", "xception_slim", "--input-size", "72", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == positional
    assert main([]) == 2 and "name one model" in capsys.readouterr().err
    assert main(["xception", "--model", "xception_slim"]) == 2


def test_the_curves_tool_has_a_help_that_exits_zero():
    result = subprocess.run([sys.executable, "-m", "xception_mx.metrics", "-h"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0 and "METRICS.jsonl OUT.png" in result.stdout
