"""Mixed precision (--amp): the float16 graph and loss scaler checked on CPU, bfloat16 training where the CPU has
avx512_bf16 (exact resume, float32 checkpoints and exports, the demo's accuracy), and the loop's host reads.

``amp.init`` patches MXNet for the rest of a process, so everything that turns AMP on runs in a subprocess.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import ROOT, assert_same_states, base_args, needs_cpu_flag, straight_and_resumed, train_cli
from xception_mx.metrics import read_jsonl

needs_bf16 = needs_cpu_flag("avx512_bf16", "--amp bfloat16 is refused on it (oneDNN would emulate bfloat16)")


def python(script: str, *args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_float16_training_graph_infers_types_end_to_end_on_cpu():
    """The full float16 training graph (AMP-converted hybridized network, loss, loss scaling, backward) binds on
    CPU: type inference finds no float16/float32 mismatch; convolutions run in float16, parameters, their
    gradients, BatchNorm and the loss stay float32."""
    result = python("""
        import json
        import mxnet as mx, numpy as np
        from xception_mx.precision import Precision
        Precision("float16")
        from xception_mx import get_model
        net = get_model("xception_slim", num_classes=4, filter_list=(8, 8, 16, 16, 24, 24, 32))
        net.initialize()
        net.hybridize()
        logits = net(mx.sym.var("data"))
        loss = mx.gluon.loss.SoftmaxCrossEntropyLoss()(logits, mx.sym.var("label"))
        scaled = mx.sym.broadcast_mul(loss, mx.sym.var("scale"))
        exe = scaled.simple_bind(mx.cpu(), grad_req="write", data=(4, 3, 72, 72), label=(4,), scale=(1,),
                                 type_dict={"data": "float32", "label": "float32", "scale": "float32"})
        internals = logits.get_internals()
        _, types, _ = internals.infer_type(data="float32")
        dtypes = {name: np.dtype(t).name for name, t in zip(internals.list_outputs(), types)}
        def kinds(test):
            return sorted({t for name, t in dtypes.items() if test(name)})
        print(json.dumps({
            "casts": sum(1 for name in dtypes if "_amp_cast" in name or "_amp_multicast" in name),
            "conv": kinds(lambda n: "_conv" in n and n.endswith("_fwd_output")),
            "bn_params": kinds(lambda n: "_batchnorm" in n and n.endswith(("gamma", "beta", "mean", "var"))),
            "params": sorted({np.dtype(a.dtype).name for a in exe.arg_dict.values()}),
            "grads": sorted({np.dtype(g.dtype).name for g in exe.grad_dict.values() if g is not None}),
            "loss": np.dtype(exe.outputs[0].dtype).name}))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["casts"] > 0
    assert found == {**found, "conv": ["float16"], "bn_params": ["float32"], "params": ["float32"],
                     "grads": ["float32"], "loss": "float32"}


def test_loss_scaler_skips_nonfinite_steps_lowers_then_raises_the_scale_and_round_trips():
    result = python("""
        import json
        import mxnet as mx, numpy as np
        from mxnet import gluon
        from xception_mx.precision import Precision
        precision = Precision("float16", loss_scale_window=3)
        w = gluon.Parameter("w", shape=(4,), init=mx.init.One())
        w.initialize(ctx=mx.cpu())
        trainer = gluon.Trainer([w], "sgd", {"learning_rate": 0.1, "momentum": 0.9})
        precision.attach(trainer)
        seen = []
        def step(grad):
            with mx.autograd.record():
                loss = (w.data() * mx.nd.full((4,), grad)).sum()  # its gradient: grad
                with precision.scaled([loss]) as scaled:
                    mx.autograd.backward(scaled)
            before = w.data().asnumpy().copy()
            trainer.step(1)
            seen.append({"changed": bool((w.data().asnumpy() != before).any()), **precision.state()})
        step(np.nan)
        step(np.inf)
        for _ in range(4):
            step(1.0)
        saved = precision.state()
        other = Precision("float16", loss_scale_window=3)
        other.attach(gluon.Trainer([w], "sgd", {"learning_rate": 0.1}))
        other.restore(saved)
        print(json.dumps({"seen": seen, "restored": other.state(), "saved": saved}))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    seen, start = out["seen"], 2.0 ** 16
    assert [s["changed"] for s in seen] == [False, False, True, True, True, True]  # overflowing steps skipped
    # MXNet's scaler takes a new scale at the next step: halved after each overflow ...
    assert [s["next_loss_scale"] for s in seen[:2]] == [start / 2, start / 4]
    # ... then doubled after loss_scale_window (3) good steps at the lowered scale.
    assert [s["next_loss_scale"] for s in seen[2:]] == [start / 4, start / 4, start / 2, start / 2]
    assert [s["loss_scale"] for s in seen[2:]] == [start / 4, start / 4, start / 4, start / 2]
    assert [s["good_steps"] for s in seen] == [0, 0, 1, 2, 0, 1]
    assert out["restored"] == out["saved"]


@pytest.mark.slow
def test_the_loop_reads_the_host_only_at_the_log_interval(colour_shards, tmp_path):
    """Count every NDArray.asnumpy: between two steps there is none, except after steps 5, 10 and 15 (the log
    interval) and at the end of the epoch (16 steps of 4 images)."""
    result = python("""
        import json, sys
        import mxnet as mx
        from xception_mx import cli, train
        reads, at_step = [0], []
        real_read, real_batch = mx.nd.NDArray.asnumpy, train.Trainer._train_batch
        def counting(self):
            reads[0] += 1
            return real_read(self)
        def batch(self, *args, **kwargs):
            at_step.append(reads[0])
            return real_batch(self, *args, **kwargs)
        mx.nd.NDArray.asnumpy, train.Trainer._train_batch = counting, batch
        code = cli.train_main(sys.argv[1:])
        print(json.dumps({"code": code, "at_step": at_step}))
    """, *base_args(colour_shards, tmp_path / "run", "--num-epochs", "1", "--batch-size", "4", "--log-interval", "5",
                    "--checkpoint-interval", "0", "--ema", "0.9", "--label-smoothing", "0.1", "--mixup", "0.2"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    at_step = out["at_step"]
    assert len(at_step) == 16
    read_after = [i + 1 for i in range(15) if at_step[i + 1] != at_step[i]]
    assert read_after == [5, 10, 15]


@pytest.mark.slow
@needs_bf16
def test_bfloat16_resume_with_accumulation_is_bit_exact_and_checkpoints_stay_float32(colour_shards, tmp_path):
    extra = ("--amp", "bfloat16", "--ema", "0.8", "--label-smoothing", "0.1", "--accumulate", "2",
             "--clip-grad-norm", "1.0")
    straight, resumed = straight_and_resumed(colour_shards, tmp_path, *extra)
    a = assert_same_states(straight, resumed, 2)
    assert {v.dtype for v in a.values()} == {np.dtype(np.float32)}  # master weights, optimizer state, EMA
    # The export is the float32 network (no AMP casts) and an fp32 run can --retrain from the AMP checkpoint.
    symbol = json.loads((straight / "xception_slim-symbol.json").read_text())
    assert not {n["op"] for n in symbol["nodes"]} & {"amp_cast", "amp_multicast"}
    result = train_cli(base_args(colour_shards, resumed, "--retrain", "--model-load-epoch", "2", "--lr", "0.01",
                                 "--amp", "off", "--num-epochs", "3"))
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_jsonl(str(resumed / "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [1, 2, 3]


@pytest.mark.slow
@needs_bf16
def test_the_demo_trained_in_bfloat16_reaches_97_percent(tmp_path):
    made = subprocess.run([sys.executable, "-m", "im2rec_tools", "demo-digits", str(tmp_path / "data")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "run"
    trained = train_cli(["--config", os.path.join(ROOT, "configs", "demo_digits.yaml"), "--data-dir",
                         str(tmp_path / "data"), "--output-dir", str(out), "--amp", "bfloat16", "--num-epochs", "4"],
                        timeout=1500)
    assert trained.returncode == 0, trained.stderr[-2000:]
    records = read_jsonl(str(out / "metrics.jsonl"))
    assert max(r["val_top1"] for r in records) >= 0.97, records
    report = tmp_path / "score.json"
    scored = subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), "--model-prefix",
                             str(out / "xception_slim"), "--epoch", "4", "--rec", str(tmp_path / "data" / "val"),
                             "--json", str(report)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(report.read_text())["top1"] >= 0.97


def test_bfloat16_keeps_only_unblocked_depthwise_convolutions_float32_and_relu_is_activation():
    """Regression tests of two workarounds (xception_mx.precision, xception_mx.model.relu): under bfloat16 AMP a
    depthwise convolution runs float32 exactly when its width is not a multiple of 16 (728 at the paper's widths;
    none at ``channel_multiple`` 16), every other convolution bfloat16 (type inference only, any CPU); every ReLU is
    an ``Activation`` (oneDNN's bfloat16 kernel), in both families."""
    result = python("""
        import json
        import mxnet as mx, numpy as np
        from xception_mx.precision import Precision
        Precision("bfloat16")
        from xception_mx import get_model
        found = {}
        for name, kwargs in (("xception_slim", {"filter_list": (8, 8, 16, 16, 24, 24, 32)}), ("xception41", {}),
                             ("xception41", {"channel_multiple": 16})):
            net = get_model(name, num_classes=4, **kwargs)
            net.initialize()
            internals = net(mx.sym.var("data")).get_internals()
            _, types, _ = internals.infer_type(data="float32")
            graph = json.loads(internals.tojson())
            conv_nodes = {n["name"] + "_output": n for n in graph["nodes"] if n["op"] == "Convolution"}
            width = {name: int(n["attrs"]["num_filter"]) for name, n in conv_nodes.items()}
            grouped = {name for name, n in conv_nodes.items() if int(n.get("attrs", {}).get("num_group", "1")) > 1}
            convs = {node: "float32" if np.dtype(dtype) == np.float32 else "bfloat16"
                     for node, dtype in zip(internals.list_outputs(), types) if node in conv_nodes}
            found[f"{name} {kwargs}"] = {
                "depthwise": sorted({(width[n] % 16 == 0, t) for n, t in convs.items() if n in grouped}),
                "pointwise": sorted({t for n, t in convs.items() if n not in grouped}),
                "ops": sorted({n["op"] for n in graph["nodes"]})}
        print(json.dumps(found))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for name, seen in found.items():
        assert seen["pointwise"] == ["bfloat16"], name
        assert "relu" not in seen["ops"] and "Activation" in seen["ops"], name
    blocked_and_not = [[False, "float32"], [True, "bfloat16"]]
    assert found["xception_slim {'filter_list': (8, 8, 16, 16, 24, 24, 32)}"]["depthwise"] == blocked_and_not
    assert found["xception41 {}"]["depthwise"] == blocked_and_not  # 728 float32; 128, 256, 1024, 1536 bfloat16
    assert found["xception41 {'channel_multiple': 16}"]["depthwise"] == [[True, "bfloat16"]]


@needs_cpu_flag("amx_bf16", "AMX is only requested where the CPU has it")
def test_amx_is_requested_and_used_by_onednn_for_bfloat16():
    """Regression test of the AMX workaround (xception_mx.cpuinfo.enable_amx): after it, oneDNN runs a bfloat16
    convolution on an AMX kernel (DNNL_VERBOSE); a DNNL_MAX_CPU_ISA the user set is kept."""
    script = """
        import os, sys
        from xception_mx.cpuinfo import enable_amx
        print(enable_amx(os.environ), flush=True)
        os.environ["DNNL_VERBOSE"] = "1"
        import mxnet as mx
        from mxnet.contrib.amp.amp import bfloat16
        x = mx.nd.amp_cast(mx.nd.ones((16, 64, 14, 14)), dtype=bfloat16)
        w = mx.nd.amp_cast(mx.nd.ones((64, 64, 1, 1)), dtype=bfloat16)
        mx.nd.Convolution(x, w, kernel=(1, 1), num_filter=64, no_bias=True).wait_to_read()
    """
    result = python(script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("AMX on") and "amx" in result.stdout.split("exec,cpu,convolution", 1)[1]
    env = {**os.environ, "DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    kept = subprocess.run([sys.executable, "-c", "import os; from xception_mx.cpuinfo import enable_amx; "
                           "print(enable_amx(os.environ))"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert kept.stdout.strip() == "DNNL_MAX_CPU_ISA=AVX512_CORE_BF16 as set"
