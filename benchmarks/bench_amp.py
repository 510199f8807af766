"""Training steps, ours in fp32 and ``--amp bfloat16`` at ``channel_multiple`` 1 and 16, against timm (channels_last)
in fp32 and under ``torch.autocast('cpu', torch.bfloat16)``: img/s and peak memory, one process per measurement,
the six alternating, every model and batch size in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_amp.py --models xception,xception41 --batch-sizes 16,32

Ours runs the product's path: ``enable_amx``, ``Precision`` (``mx.contrib.amp``; depthwise convolutions whose width
is not a multiple of 16 kept float32) and ``TrainStep`` on the hybridized network built with ``channel_multiple``,
as ``train_xception.py --amp bfloat16 --channel-multiple N`` does. A step is
forward + backward + SGD-momentum update at 299 px; each process times ``--repeats`` steps after ``--warmup`` and
reports the median, and its peak resident memory (``ru_maxrss``: weights, optimizer state, activations, workspace
and the framework). Rounds alternate the four; the table gives the median over rounds. timm runs in the reference
venv (``XCEPTION_MX_REF_PYTHON``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_timm import REF_PYTHON, ROOT, TIMM_NAMES, _median_rate  # noqa: E402

from xception_mx.cpuinfo import cpu_line  # noqa: E402  (stdlib only: the reference venv's workers import it too)

#: (framework, precision, channel_multiple); timm's multiple is 1 (its widths are the paper's).
VARIANTS = [("ours", "fp32", 1), ("ours", "fp32", 16), ("timm", "fp32", 1), ("ours", "bf16", 1), ("ours", "bf16", 16),
            ("timm", "bf16", 1)]


def worker_ours(model: str, precision: str, multiple: int, size: int, batch: int, warmup: int, repeats: int) -> dict:
    from xception_mx.cpuinfo import enable_amx

    amx = enable_amx(os.environ) if precision == "bf16" else "fp32"  # before MXNet loads, as train_xception.py does
    from xception_mx.precision import Precision

    Precision("bfloat16" if precision == "bf16" else "off")  # before the network is built, as the trainer does
    import mxnet as mx
    from mxnet import gluon

    from xception_mx import get_model
    from xception_mx.step import TrainStep

    mx.random.seed(0)
    net = get_model(model, channel_multiple=multiple)
    net.initialize(ctx=mx.cpu())
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9})
    step = TrainStep(net, trainer, gluon.loss.SoftmaxCrossEntropyLoss(), [mx.cpu()], batch)
    x = mx.nd.random.uniform(-1, 1, shape=(batch, 3, size, size))
    y = mx.nd.array([i % 1000 for i in range(batch)])
    rate = _median_rate(lambda: step(x, y, y), batch, warmup, repeats, mx.nd.waitall)
    return {"rate": rate, "version": f"mxnet {mx.__version__}", "setup": amx}


def worker_timm(model: str, precision: str, multiple: int, size: int, batch: int, warmup: int, repeats: int) -> dict:
    import contextlib

    import timm
    import torch

    torch.manual_seed(0)
    net = timm.create_model(TIMM_NAMES.get(model, model), pretrained=False).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = (torch.rand(batch, 3, size, size) * 2 - 1).to(memory_format=torch.channels_last)
    y = torch.arange(batch) % 1000
    loss_fn = torch.nn.CrossEntropyLoss()

    def train():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    net.train()
    rate = _median_rate(train, batch, warmup, repeats, lambda: None)
    return {"rate": rate, "version": f"torch {torch.__version__}, timm {timm.__version__}, "
                                     f"{torch.get_num_threads()} threads"}


def _run(model: str, variant: tuple, batch: int, args) -> dict:
    kind, precision, multiple = variant
    python = sys.executable if kind == "ours" else REF_PYTHON
    cmd = [python, os.path.abspath(__file__), "--worker", f"{model}:{kind}:{precision}:{multiple}", "--batch-sizes",
           str(batch), "--size", str(args.size), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"bench_amp: {model} {kind} {precision} x{multiple} at batch {batch} failed:\n"
                         f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(variant: tuple) -> str:
    kind, precision, multiple = variant
    return f"{kind} {precision}" + (f" m{multiple}" if kind == "ours" else "")


def _table(model: str, batches: list[int], runs: dict) -> dict:
    """Print one model's table (medians over rounds; peak memory the largest) and return its figures."""
    rate = {(b, v): statistics.median(r["rate"] for r in runs[(model, b, v)]) for b in batches for v in VARIANTS}
    peak = {(b, v): max(r["peak_mib"] for r in runs[(model, b, v)]) for b in batches for v in VARIANTS}
    print(f"\n{model}: img/s (peak MiB)\n")
    print("| batch | " + " | ".join(_label(v) for v in VARIANTS)
          + " | ours bf16 m16 / ours fp32 m1 | ours bf16 m16 / timm bf16 | ours fp32 m16 / timm fp32 |")
    print("|---" * (len(VARIANTS) + 4) + "|")
    ours16, ours1 = ("ours", "bf16", 16), ("ours", "fp32", 1)
    for b in batches:
        cells = " | ".join(f"{rate[(b, v)]:.2f} ({peak[(b, v)]:.0f})" for v in VARIANTS)
        print(f"| {b} | {cells} | {rate[(b, ours16)] / rate[(b, ours1)]:.2f}x "
              f"| {rate[(b, ours16)] / rate[(b, ('timm', 'bf16', 1))]:.2f}x "
              f"| {rate[(b, ('ours', 'fp32', 16))] / rate[(b, ('timm', 'fp32', 1))]:.2f}x |")
    return {f"batch {b}": {_label(v): {"rate": rate[(b, v)], "peak_mib": peak[(b, v)]} for v in VARIANTS}
            for b in batches}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="xception,xception41")
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.worker:
        model, kind, precision, multiple = args.worker.split(":")
        work = worker_ours if kind == "ours" else worker_timm
        out = work(model, precision, int(multiple), args.size, batches[0], args.warmup, args.repeats)
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return 0
    if not os.access(REF_PYTHON, os.X_OK):
        raise SystemExit(f"bench_amp: no reference venv at {REF_PYTHON}: run bash scripts/setup_ref_venv.sh")
    models = args.models.split(",")
    runs: dict = {}
    for _ in range(args.rounds):
        for model in models:
            for batch in batches:
                for variant in VARIANTS:
                    result = _run(model, variant, batch, args)
                    runs.setdefault((model, batch, variant), []).append(result)
                    print(f"# {model} batch {batch} {_label(variant)}: {result['rate']:.2f} img/s, "
                          f"{result['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    print(f"# {cpu_line()}; {args.size} px, median of {args.repeats} steps after {args.warmup}, median over "
          f"{args.rounds} round(s), the six alternating; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    first = runs[(models[0], batches[0], VARIANTS[0])][0]
    timm = runs[(models[0], batches[0], ("timm", "fp32", 1))][0]
    print(f"# ours: {first['version']}, hybridized, bf16 setup: "
          f"{runs[(models[0], batches[0], ('ours', 'bf16', 16))][0]['setup']}; timm: {timm['version']}, channels_last")
    tables = {model: _table(model, batches, runs) for model in models}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_line(), "args": vars(args), "tables": tables}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
