"""Deployment: oneDNN fusion, INT8, ONNX and the softmax head for MXNet's Module tools, on a trained digits model."""
import json
import os
import re
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from helpers import ROOT, TINY_FILTERS, needs_cpu_flag
from xception_mx import get_model
from xception_mx.deploy import main as deploy_main

pytestmark = pytest.mark.slow


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def one_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The demo's digits shards and a briefly trained model (the demo recipe, 2 epochs: about 93% top-1, where
    reduced precision is more likely to flip predictions than on a converged model)."""
    folder = tmp_path_factory.mktemp("digits")
    made = run("-m", "im2rec_tools", "demo-digits", folder / "data")
    assert made.returncode == 0, made.stderr
    out = folder / "run"
    config = os.path.join(ROOT, "configs", "demo_digits.yaml")
    trained = run(os.path.join(ROOT, "train_xception.py"), "--config", config, "--data-dir", folder / "data",
                  "--output-dir", out, "--num-epochs", "2", timeout=900)
    assert trained.returncode == 0, trained.stderr[-2000:]
    return folder / "data", out / "xception_slim", 2


def score_json(prefix, epoch, rec, *extra, tmp):
    report = tmp / f"score-{os.path.basename(str(prefix))}-{len(extra)}.json"
    result = run(os.path.join(ROOT, "score.py"), "--model-prefix", prefix, "--epoch", epoch, "--rec", rec,
                 "--json", report, *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(report.read_text())


@pytest.mark.parametrize("name, kwargs", [("xception", {}), ("xception_slim", {}),
                                          ("xception_slim", {"filter_list": TINY_FILTERS}), ("xception41", {})])
def test_onednn_fusion_partitions_every_model_and_keeps_the_logits(name, kwargs):
    """Regression test of the residual-sum order (rep(x) + residual made MKLDNN's partitioning fail)."""
    net = get_model(name, num_classes=10, **kwargs)
    net.initialize()
    x = mx.nd.random.uniform(-1, 1, (2, 3, 96, 96))
    unfused = net(x).asnumpy()
    net.hybridize(static_alloc=True)
    np.testing.assert_array_equal(net(x).asnumpy(), unfused)
    net.optimize_for(x, backend="MKLDNN", static_alloc=True)
    fused = net(x).asnumpy()
    assert np.abs(fused - unfused).max() <= 1e-5
    graph = net._cached_graph[1].tojson()
    assert "_sg_mkldnn_conv" in graph  # it did fuse


def test_score_fuses_and_pads_by_default_and_agrees_with_the_graph_as_exported(digits, tmp_path):
    data, prefix, epoch = digits
    fused = score_json(prefix, epoch, data / "val", tmp=tmp_path)
    plain = score_json(prefix, epoch, data / "val", "--no-fuse", "--channel-multiple", "1", tmp=tmp_path)
    assert fused["fused"] and not plain["fused"]
    assert (fused["channel_multiple"], plain["channel_multiple"]) == (16, 1)
    assert fused["top1"] == plain["top1"] and fused["images"] == plain["images"] == 359
    assert fused["cross_entropy"] == pytest.approx(plain["cross_entropy"], rel=1e-5)


@needs_cpu_flag("avx512_bf16", "bfloat16 inference is refused without it")
def test_bfloat16_scoring_pads_at_load_and_stays_within_half_a_point_of_fp32(digits, tmp_path):
    data, prefix, epoch = digits
    fp32 = score_json(prefix, epoch, data / "val", tmp=tmp_path)
    bf16 = score_json(prefix, epoch, data / "val", "--amp", "bfloat16", tmp=tmp_path)
    assert (bf16["amp"], bf16["channel_multiple"], fp32["amp"], fp32["channel_multiple"]) == ("bfloat16", 16, "off", 16)
    assert bf16["images"] == fp32["images"] == 359
    assert abs(bf16["top1"] - fp32["top1"]) <= 0.005, (bf16["top1"], fp32["top1"])


@needs_cpu_flag("avx512_bf16", "xception-deploy bfloat16 is refused without it")
def test_bfloat16_export_keeps_the_papers_shapes_in_half_the_bytes_and_scores_within_half_a_point(digits, tmp_path):
    data, prefix, epoch = digits
    out = tmp_path / "bf16"
    result = run("-m", "xception_mx.deploy", "bfloat16", "--model-prefix", prefix, "--epoch", epoch, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    fp32_params = mx.nd.load(f"{prefix}-{epoch:04d}.params")
    bf16_params = mx.nd.load(f"{out}-0000.params")
    assert {k: v.shape for k, v in bf16_params.items()} == {k: v.shape for k, v in fp32_params.items()}
    weights = [v for k, v in bf16_params.items() if k.endswith("_weight")]  # convolutions and the classifier
    assert weights and all(v.dtype != np.float32 for v in weights)
    assert os.path.getsize(f"{out}-0000.params") < 0.6 * os.path.getsize(f"{prefix}-{epoch:04d}.params")
    fp32 = score_json(prefix, epoch, data / "val", tmp=tmp_path)
    bf16 = score_json(out, 0, data / "val", tmp=tmp_path)
    assert (bf16["amp"], bf16["channel_multiple"], bf16["fused"]) == ("bfloat16", 16, False)
    assert bf16["images"] == 359 and abs(bf16["top1"] - fp32["top1"]) <= 0.005, (bf16["top1"], fp32["top1"])
    refused = run("-m", "xception_mx.deploy", "onnx", "--model-prefix", out, "--epoch", 0, "--out", tmp_path / "m.onnx")
    assert refused.returncode == 2 and "bfloat16 export" in one_line(refused)


def test_int8_scores_within_half_a_point_of_fp32(digits, tmp_path):
    data, prefix, epoch = digits
    out = tmp_path / "int8"
    result = run("-m", "xception_mx.deploy", "int8", "--model-prefix", prefix, "--epoch", epoch, "--calib-rec",
                 data / "val", "--num-calib-images", 128, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "int8-preprocess.json").is_file()
    fp32 = score_json(prefix, epoch, data / "val", tmp=tmp_path)
    int8 = score_json(out, 0, data / "val", tmp=tmp_path)
    assert int8["images"] == fp32["images"] == 359
    assert abs(int8["top1"] - fp32["top1"]) <= 0.005, (int8["top1"], fp32["top1"])
    assert "_sg_mkldnn_conv" in (tmp_path / "int8-symbol.json").read_text()


@pytest.mark.parametrize("flags, batch", [([], None), (["--dynamic-batch"], None), (["--batch-size", "2"], 2)])
def test_onnx_matches_mxnet_and_carries_the_protocol(digits, tmp_path, flags, batch, capsys):
    """A free batch dimension by default (--dynamic-batch: the old spelling, a no-op), a fixed one with --batch-size;
    onnxruntime runs the free one at batch 1 and 4 and refuses another batch on a fixed one."""
    import onnx
    import onnxruntime

    data, prefix, epoch = digits
    path = tmp_path / "model.onnx"
    assert deploy_main(["onnx", "--model-prefix", str(prefix), "--epoch", str(epoch), "--out", str(path),
                        *flags]) == 0
    printed = capsys.readouterr().out
    diff = float(re.search(r"max \|logit diff\| against MXNet ([0-9.e+-]+)", printed).group(1))
    assert diff <= 1e-4
    assert ("batch 2;" if batch else "a free batch dimension, checked at batches 1 and 4;") in printed
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["xception_mx.preprocess"])["input_size"] == 72
    assert [i.name for i in model.graph.input] == ["data"]  # the weights are initializers, not inputs
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == batch if batch else (dim.dim_value == 0)  # 0: free
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in (1, 4):
        x = np.random.RandomState(size).uniform(-1, 1, (size, 3, 72, 72)).astype(np.float32)
        if batch:
            with pytest.raises(Exception, match="Got invalid dimensions"):
                session.run(None, {"data": x})
        else:
            ours = _mxnet_logits(prefix, epoch, x)
            np.testing.assert_allclose(session.run(None, {"data": x})[0], ours, atol=1e-4)


def _mxnet_logits(prefix, epoch, x):
    from xception_mx.inference import load_exported

    return load_exported(str(prefix), epoch, [mx.cpu()])(mx.nd.array(x)).asnumpy()


def test_softmax_head_binds_in_module_and_gives_scores_top1(digits, tmp_path):
    from xception_mx import data as xdata
    from xception_mx.score import export_protocol

    data, prefix, epoch = digits
    out = tmp_path / "softmax"
    result = run("-m", "xception_mx.deploy", "softmax-head", "--model-prefix", prefix, "--epoch", epoch, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pooled features: pooled_features_output" in result.stdout
    sym, args, aux = mx.model.load_checkpoint(str(out), 0)
    pre = export_protocol(str(out))
    val = xdata.val_iter(str(data / "val"), 32, (3, pre.input_size, pre.input_size), crop_pct=pre.crop_pct,
                         mean=pre.mean, std=pre.std, inter_method=pre.inter_method, preprocess_threads=2)
    mod = mx.mod.Module(sym, data_names=("data",), label_names=("softmax_label",), context=mx.cpu())
    mod.bind(data_shapes=val.provide_data, label_shapes=val.provide_label, for_training=False)
    mod.set_params(args, aux)
    correct = total = 0
    for batch in val:
        mod.forward(batch, is_train=False)
        probs = mod.get_outputs()[0].asnumpy()
        valid = probs.shape[0] - batch.pad
        labels = batch.label[0].asnumpy()[:valid]
        correct += int((probs[:valid].argmax(axis=1) == labels).sum())
        total += valid
    scored = score_json(prefix, epoch, data / "val", tmp=tmp_path)
    assert total == scored["images"] and correct / total == scored["top1"]
    assert "pooled_features_output" in sym.get_internals().list_outputs()
    # Folded normalisation: 0-255 pixels in (MXNet's example score.py has no std), the same probabilities out.
    raw = tmp_path / "raw"
    assert run("-m", "xception_mx.deploy", "softmax-head", "--model-prefix", prefix, "--epoch", epoch, "--out", raw,
               "--normalise-inside").returncode == 0
    rsym, rargs, raux = mx.model.load_checkpoint(str(raw), 0)
    raw_mod = mx.mod.Module(rsym, label_names=("softmax_label",), context=mx.cpu())
    raw_mod.bind(data_shapes=val.provide_data, label_shapes=val.provide_label, for_training=False)
    raw_mod.set_params(rargs, raux)
    pixels = mx.nd.random.uniform(0, 255, (32, 3, pre.input_size, pre.input_size))
    mod.forward(mx.io.DataBatch([(pixels - 127.5) / 127.5]), is_train=False)
    raw_mod.forward(mx.io.DataBatch([pixels]), is_train=False)
    np.testing.assert_allclose(raw_mod.get_outputs()[0].asnumpy(), mod.get_outputs()[0].asnumpy(), atol=1e-5)


@pytest.mark.parametrize("case, fragment", [
    ("empty_calib", "hold no records"),
    ("no_vnni", "no VNNI instructions"),
    ("onnx_out_under_a_file", "is a file, not a folder"),
    ("onnx_too_new", "pip install 'onnx>=1.14,<1.17'"),
    ("no_bf16", "lacks bfloat16 instructions"),
])
def test_bad_deploy_input_is_one_line_and_writes_nothing(digits, tmp_path, case, fragment):
    data, prefix, epoch = digits
    base = ["--model-prefix", str(prefix), "--epoch", str(epoch)]
    if case == "empty_calib":
        (tmp_path / "empty.rec").write_bytes(b"")
        (tmp_path / "empty.idx").write_bytes(b"")
        args = ["int8", *base, "--calib-rec", str(tmp_path / "empty.rec"), "--out", str(tmp_path / "q")]
    elif case == "no_vnni":
        args = ["int8", *base, "--calib-rec", str(data / "val"), "--out", str(tmp_path / "q")]
    elif case == "no_bf16":
        args = ["bfloat16", *base, "--out", str(tmp_path / "b")]
    elif case == "onnx_out_under_a_file":
        (tmp_path / "notes.txt").write_text("a file")
        args = ["onnx", *base, "--out", str(tmp_path / "notes.txt" / "m.onnx")]
    else:
        args = ["onnx", *base, "--out", str(tmp_path / "m.onnx")]
    patch = {"no_vnni": "deploy._cpu_flags = lambda: {'avx2', 'avx512f'}\n",
             "onnx_too_new": "import onnx; del onnx.mapping\n",
             "no_bf16": "from xception_mx import inference; inference.cpu_flags = lambda: {'avx512f'}\n"}.get(case, "")
    script = f"import sys\nfrom xception_mx import deploy\n{patch}sys.exit(deploy.main({args!r}))\n"
    result = run("-c", script)
    assert result.returncode != 0
    assert fragment in one_line(result)
    before = {"empty_calib": ["empty.idx", "empty.rec"], "onnx_out_under_a_file": ["notes.txt"]}.get(case, [])
    assert sorted(os.listdir(tmp_path)) == before


def test_the_trainer_writes_softmax_head_exports_when_asked(colour_shards, tmp_path):
    from helpers import base_args, train_cli

    out = tmp_path / "run"
    assert train_cli(base_args(colour_shards, out, "--num-epochs", "1", "--softmax-head")).returncode == 0
    sym, args, aux = mx.model.load_checkpoint(str(out / "xception_slim-softmax"), 1)
    assert "softmax_label" in sym.list_arguments()
    mod = mx.mod.Module(sym, label_names=("softmax_label",), context=mx.cpu())
    mod.bind(data_shapes=[("data", (2, 3, 72, 72))], label_shapes=[("softmax_label", (2,))], for_training=False)
    mod.set_params(args, aux)
    mod.forward(mx.io.DataBatch([mx.nd.zeros((2, 3, 72, 72))]), is_train=False)
    probs = mod.get_outputs()[0].asnumpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
