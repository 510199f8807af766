"""Inference img/s of an export through every deployment path, padded and not, against timm, per model.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_inference.py --models xception,xception41 --batch-sizes 8

Ours, each at ``channel_multiple`` 1 and 16 (padded at load, ``inference.load_exported``): fp32 as exported
(unfused), fp32 fused by oneDNN (``optimize_for('MKLDNN')``), bfloat16 (``amp.convert_hybrid_block``: what
``score.py --amp bfloat16`` runs), INT8 (``xception-deploy int8``'s ``quantize``, calibrated on random batches:
speed only); onnxruntime on the ONNX export; timm (channels_last, eval, ``torch.no_grad``) in fp32 and under bf16
autocast, from the reference venv, in its own process, between ours and onnxruntime. Random weights, median of
``--repeats`` after ``--warmup``. Prints a Markdown table per model headed by the CPU model and flags.
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

#: Our models timm has (under TIMM_NAMES' names).
TIMM_MODELS = ("xception", "xception41", "xception65", "xception71")
#: Our paths, each at channel_multiple 1 and 16: (label, Speedups arguments or None for INT8).
OURS = (("fp32 unfused", {"fuse": False}), ("fp32 fused", {}), ("bf16", {"amp": "bfloat16"}), ("INT8", None))


def _timm_rate(model: str, size: int, batch: int, warmup: int, repeats: int, bf16: bool) -> float | None:
    """timm's img/s, or None for a model timm does not have (``xception_slim``)."""
    name = TIMM_NAMES.get(model, model)
    if model not in TIMM_MODELS:
        return None
    autocast = "torch.autocast('cpu', dtype=torch.bfloat16)" if bf16 else "contextlib.nullcontext()"
    code = (f"import sys, json, contextlib; sys.path.insert(0, {HERE!r})\n"
            "from bench_vs_timm import _median_rate\n"
            "import timm, torch\n"
            "torch.manual_seed(0)\n"
            f"net = timm.create_model({name!r}, pretrained=False).eval().to(memory_format=torch.channels_last)\n"
            f"x = (torch.rand({batch}, 3, {size}, {size}) * 2 - 1).to(memory_format=torch.channels_last)\n"
            f"with torch.no_grad(), {autocast}:\n"
            f"    print(json.dumps(_median_rate(lambda: net(x), {batch}, {warmup}, {repeats}, lambda: None)))\n")
    proc = subprocess.run([REF_PYTHON, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_inference: timm failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def _export(model: str, size: int, folder: str) -> str:
    """A random-weight export of ``model`` at the paper's widths, with its protocol and an ONNX file."""
    import mxnet as mx

    from xception_mx import get_model
    from xception_mx.deploy import export_onnx
    from xception_mx.protocol import Preprocess

    mx.random.seed(0)
    net = get_model(model)
    net.initialize()
    net.hybridize()
    net(mx.nd.zeros((1, 3, size, size)))
    prefix = os.path.join(folder, model)
    net.export(prefix, 0)
    Preprocess(input_size=size).write(prefix)
    export_onnx(prefix, 0, prefix + ".onnx")  # a free batch dimension
    return prefix


def _ours(prefix: str, label: str, options, multiple: int, shape, batch: int):
    """Our network on one path, as score.py / xception-deploy build it."""
    import mxnet as mx

    from xception_mx import data
    from xception_mx.deploy import quantize
    from xception_mx.inference import Speedups, load_exported, ready

    if options is not None:
        return ready(prefix, 0, [mx.cpu()], shape, Speedups(channel_multiple=multiple, **options)).net
    block = load_exported(prefix, 0, [mx.cpu()], multiple)
    block.hybridize(static_alloc=True, static_shape=True)
    return quantize(block, data.synthetic_iter(batch, shape, 1000, 2), 2 * batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="xception,xception41")
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--batch-sizes", default="8")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    import mxnet as mx
    import numpy as np
    import onnxruntime as ort

    shape = (3, args.size, args.size)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench_inference_")
    print(f"# {cpu_line()}; {args.size} px, median of {args.repeats} after {args.warmup}; mxnet {mx.__version__}, "
          f"onnxruntime {ort.__version__}; timm in its own process, channels_last, eval, no_grad")
    tables = {}
    for model in args.models.split(","):
        prefix = _export(model, args.size, tmp)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(prefix + ".onnx", options, providers=["CPUExecutionProvider"])
        rows = {}
        for batch in batches:
            x = mx.nd.array(np.random.RandomState(batch).uniform(-1, 1, (batch, *shape)).astype(np.float32))
            row = {}
            for label, speedups in OURS:
                for multiple in (1, 16):
                    block = _ours(prefix, label, speedups, multiple, shape, batch)
                    row[f"{label} m{multiple}"] = _median_rate(lambda b=block, x=x: b(x), batch, args.warmup,
                                                               args.repeats, mx.nd.waitall)
                    del block
            row["timm fp32"] = _timm_rate(model, args.size, batch, args.warmup, args.repeats, False)
            feed = {session.get_inputs()[0].name: x.asnumpy()}
            row["onnxruntime"] = _median_rate(lambda f=feed, s=session: s.run(None, f), batch, args.warmup,
                                              args.repeats, lambda: None)
            row["timm bf16"] = _timm_rate(model, args.size, batch, args.warmup, args.repeats, True)
            rows[batch] = row
        tables[model] = rows
        _print_table(model, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_line(), "args": vars(args), "tables": tables}, f, indent=1)
    return 0


def _print_table(model: str, rows: dict) -> None:
    paths = list(next(iter(rows.values())))
    print(f"\n{model}: img/s\n")
    print("| batch | " + " | ".join(paths) + " | best ours | best ours / best timm |")
    print("|---" * (len(paths) + 3) + "|")
    for batch, row in rows.items():
        best = max((p for p in paths if not p.startswith(("timm", "onnx"))), key=row.get)
        timm = max(row["timm fp32"], row["timm bf16"]) if row["timm fp32"] else None
        cells = " | ".join("n/a" if row[p] is None else f"{row[p]:.1f}" for p in paths)
        print(f"| {batch} | {cells} | {best} | " + (f"{row[best] / timm:.2f}x |" if timm else "n/a |"))


if __name__ == "__main__":
    raise SystemExit(main())
