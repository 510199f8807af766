"""Inference img/s of one export through every deployment path, against timm, at several batch sizes.

    .venv/bin/python benchmarks/bench_inference.py --model xception --size 299 --batch-sizes 1,8,32

Paths: MXNet fp32 as exported (unfused), fp32 fused by oneDNN (``optimize_for('MKLDNN')``, what ``score.py`` runs),
INT8 (``xception-deploy int8``'s ``quantize``, calibrated on random batches: speed only), onnxruntime on the ONNX
export, and timm's ``legacy_xception`` (channels_last, eval, ``torch.no_grad``) from the reference venv. For each
batch size the paths run one after the other (timm in its own process), random weights, median of ``--repeats``
after ``--warmup``. Prints a Markdown table headed by the CPU model and flags.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from bench_vs_timm import REF_PYTHON, TIMM_NAMES, _median_rate, cpu_line  # noqa: E402

PATHS = ("fp32 unfused", "fp32 fused", "INT8", "onnxruntime", "timm channels_last")


def _timm_rate(model: str, size: int, batch: int, warmup: int, repeats: int) -> float:
    name = TIMM_NAMES.get(model, model)
    code = (f"import sys, json; sys.path.insert(0, {HERE!r})\n"
            "from bench_vs_timm import _median_rate\n"
            "import timm, torch\n"
            "torch.manual_seed(0)\n"
            f"net = timm.create_model({name!r}, pretrained=False).eval().to(memory_format=torch.channels_last)\n"
            f"x = (torch.rand({batch}, 3, {size}, {size}) * 2 - 1).to(memory_format=torch.channels_last)\n"
            "with torch.no_grad():\n"
            f"    print(json.dumps(_median_rate(lambda: net(x), {batch}, {warmup}, {repeats}, lambda: None)))\n")
    proc = subprocess.run([REF_PYTHON, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_inference: timm failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="xception")
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    import mxnet as mx
    import numpy as np
    import onnxruntime as ort

    from xception_mx import data, get_model
    from xception_mx.deploy import export_onnx, quantize
    from xception_mx.protocol import Preprocess
    from xception_mx.score import load_exported

    shape = (3, args.size, args.size)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench_inference_")
    mx.random.seed(0)
    net = get_model(args.model)
    net.initialize()
    net.hybridize()
    net(mx.nd.zeros((1, *shape)))
    prefix = os.path.join(tmp, "m")
    net.export(prefix, 0)
    Preprocess(input_size=args.size).write(prefix)
    export_onnx(prefix, 0, prefix + ".onnx", dynamic_batch=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(prefix + ".onnx", options, providers=["CPUExecutionProvider"])

    def mxnet_net(kind: str, batch: int):
        block = load_exported(prefix, 0, [mx.cpu()])
        block.hybridize(static_alloc=True, static_shape=True)
        if kind == "fp32 fused":
            block.optimize_for(mx.nd.zeros((batch, *shape)), backend="MKLDNN", static_alloc=True, static_shape=True)
        elif kind == "INT8":
            block = quantize(block, data.synthetic_iter(batch, shape, 1000, 2), 2 * batch)
        return block

    print(f"# {cpu_line()}; {args.model} {args.size} px, median of {args.repeats} after {args.warmup}; "
          f"mxnet {mx.__version__}, onnxruntime {ort.__version__}")
    rows = {}
    for batch in batches:
        x = mx.nd.array(np.random.RandomState(batch).uniform(-1, 1, (batch, *shape)).astype(np.float32))
        row = {}
        for kind in PATHS[:3]:
            block = mxnet_net(kind, batch)
            row[kind] = _median_rate(lambda b=block, x=x: b(x), batch, args.warmup, args.repeats, mx.nd.waitall)
        feed = {session.get_inputs()[0].name: x.asnumpy()}
        row["onnxruntime"] = _median_rate(lambda f=feed: session.run(None, f), batch, args.warmup, args.repeats,
                                          lambda: None)
        row["timm channels_last"] = _timm_rate(args.model, args.size, batch, args.warmup, args.repeats)
        rows[batch] = row
    print("| batch | " + " | ".join(f"{p} img/s" for p in PATHS) + " | INT8 / unfused | fused / unfused | "
          "best / timm |")
    print("|---" * (len(PATHS) + 4) + "|")
    for batch, row in rows.items():
        best = max(row[p] for p in PATHS[:4])
        print(f"| {batch} | " + " | ".join(f"{row[p]:.1f}" for p in PATHS) +
              f" | {row['INT8'] / row['fp32 unfused']:.2f}x | {row['fp32 fused'] / row['fp32 unfused']:.2f}x | "
              f"{best / row['timm channels_last']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_line(), "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
