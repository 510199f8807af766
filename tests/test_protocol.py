"""One preprocessing protocol: written beside every export, read by score.py and predict; scoring stays light."""
import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, score_cli
from xception_mx import data
from xception_mx.convert import main as convert_main
from xception_mx.errors import UserError
from xception_mx.protocol import Preprocess


def test_importing_score_loads_neither_the_trainer_nor_the_distributed_engine_nor_gluoncv():
    script = ("import sys, xception_mx.score, xception_mx.cli\n"
              "print([m for m in ('xception_mx.train', 'xception_mx.distributed', 'gluoncv') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_protocol_round_trip_and_bad_values(tmp_path):
    pre = Preprocess(224, 0.875, (124, 116, 104), (58, 57, 57), "bicubic")
    pre.write(str(tmp_path / "m"))
    assert Preprocess.read(str(tmp_path / "m")) == pre
    assert json.loads((tmp_path / "m-preprocess.json").read_text())["resize_shorter"] == 256
    assert Preprocess.read(str(tmp_path / "none")) is None
    with pytest.raises(UserError, match="interpolation must be one of bilinear, bicubic"):
        Preprocess(interpolation="lanczos")


def test_validation_iterator_honours_the_interpolation(colour_shards):
    """Regression guard: ImageRecordIter's inter_method must reach its resize (bicubic != bilinear pixels)."""
    batches = {}
    for name, method in (("bilinear", 1), ("bicubic", 2)):
        it = data.val_iter(str(colour_shards / "val"), 8, (3, 72, 72), crop_pct=0.875, inter_method=method,
                           preprocess_threads=1)
        batches[name] = next(iter(it)).data[0].asnumpy()
    assert not np.allclose(batches["bilinear"], batches["bicubic"], atol=1e-3)
    assert np.abs(batches["bilinear"] - batches["bicubic"]).mean() < 0.1  # the same images, resized differently


def test_a_converted_timm_export_scores_bicubic_by_default(tiny_timm, colour_shards, tmp_path):
    path, _ = tiny_timm
    prefix = tmp_path / "timm"
    assert convert_main([path, str(prefix)]) == 0
    protocol = json.loads((tmp_path / "timm-preprocess.json").read_text())
    assert protocol["interpolation"] == "bicubic" and protocol["input_size"] == 299 and protocol["crop_pct"] == 0.8975
    reports = {}
    for name, extra in (("default", []), ("bilinear", ["--interpolation", "bilinear"])):
        report = tmp_path / f"{name}.json"
        result = score_cli("--model-prefix", prefix, "--epoch", 0, "--rec", colour_shards / "val", "--data-shape",
                           "3,80,80", "--json", report, *extra)
        assert result.returncode == 0, result.stderr
        reports[name] = json.loads(report.read_text())
    assert reports["default"]["protocol"]["interpolation"] == "bicubic"
    assert reports["bilinear"]["protocol"]["interpolation"] == "bilinear"
    assert reports["default"]["protocol"]["resize_shorter"] == 89  # floor(80 / 0.8975): the export's crop_pct
    assert reports["default"]["cross_entropy"] != reports["bilinear"]["cross_entropy"]
