"""Mixed-precision training steps: ours fp32 and ``--amp bfloat16`` against timm's ``legacy_xception`` (channels_last)
in fp32 and under ``torch.autocast('cpu', torch.bfloat16)``: img/s and peak memory, one process per measurement,
the four alternating, every batch size in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_amp.py --batch-sizes 16,32 --rounds 2

Ours runs the product's path: ``enable_amx``, ``Precision`` (``mx.contrib.amp``, depthwise convolutions kept
float32) and ``TrainStep`` on the hybridized network, as ``train_xception.py --amp bfloat16`` does. A step is
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
from bench_vs_timm import REF_PYTHON, ROOT, _median_rate  # noqa: E402

from xception_mx.cpuinfo import cpu_line  # noqa: E402  (stdlib only: the reference venv's workers import it too)

VARIANTS = [("ours", "fp32"), ("timm", "fp32"), ("ours", "bf16"), ("timm", "bf16")]


def worker_ours(precision: str, size: int, batch: int, warmup: int, repeats: int) -> dict:
    from xception_mx.cpuinfo import enable_amx

    amx = enable_amx(os.environ) if precision == "bf16" else "fp32"  # before MXNet loads, as train_xception.py does
    from xception_mx.precision import Precision

    Precision("bfloat16" if precision == "bf16" else "off")  # before the network is built, as the trainer does
    import mxnet as mx
    from mxnet import gluon

    from xception_mx import get_model
    from xception_mx.step import TrainStep

    mx.random.seed(0)
    net = get_model("xception")
    net.initialize(ctx=mx.cpu())
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9})
    step = TrainStep(net, trainer, gluon.loss.SoftmaxCrossEntropyLoss(), [mx.cpu()], batch)
    x = mx.nd.random.uniform(-1, 1, shape=(batch, 3, size, size))
    y = mx.nd.array([i % 1000 for i in range(batch)])
    rate = _median_rate(lambda: step(x, y, y), batch, warmup, repeats, mx.nd.waitall)
    return {"rate": rate, "version": f"mxnet {mx.__version__}", "setup": amx}


def worker_timm(precision: str, size: int, batch: int, warmup: int, repeats: int) -> dict:
    import contextlib

    import timm
    import torch

    torch.manual_seed(0)
    net = timm.create_model("legacy_xception", pretrained=False).to(memory_format=torch.channels_last)
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


def _run(kind: str, precision: str, batch: int, args) -> dict:
    python = sys.executable if kind == "ours" else REF_PYTHON
    cmd = [python, os.path.abspath(__file__), "--worker", f"{kind}:{precision}", "--batch-sizes", str(batch),
           "--size", str(args.size), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"bench_amp: {kind} {precision} at batch {batch} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.worker:
        kind, precision = args.worker.split(":")
        work = worker_ours if kind == "ours" else worker_timm
        out = work(precision, args.size, batches[0], args.warmup, args.repeats)
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return 0
    if not os.access(REF_PYTHON, os.X_OK):
        raise SystemExit(f"bench_amp: no reference venv at {REF_PYTHON}: run bash scripts/setup_ref_venv.sh")
    runs: dict = {}
    for _ in range(args.rounds):
        for batch in batches:
            for kind, precision in VARIANTS:
                result = _run(kind, precision, batch, args)
                runs.setdefault((batch, kind, precision), []).append(result)
                print(f"# batch {batch} {kind} {precision}: {result['rate']:.2f} img/s, {result['peak_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
    print(f"# {cpu_line()}; xception (timm legacy_xception) {args.size} px, median of {args.repeats} steps after "
          f"{args.warmup}, median over {args.rounds} alternating rounds; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    versions = {kind: runs[(batches[0], kind, "fp32")][0]["version"] for kind in ("ours", "timm")}
    print(f"# ours: {versions['ours']}, hybridized; timm: {versions['timm']}, channels_last")
    print("| batch | ours fp32 | ours bf16 | timm fp32 | timm bf16 | ours bf16 / ours fp32 | ours bf16 / timm bf16 "
          "| peak MiB ours fp32 / bf16 | peak MiB timm fp32 / bf16 |\n|---|---|---|---|---|---|---|---|---|")
    table = {}
    for batch in batches:
        rate = {v: statistics.median(r["rate"] for r in runs[(batch, *v)]) for v in VARIANTS}
        peak = {v: max(r["peak_mib"] for r in runs[(batch, *v)]) for v in VARIANTS}
        table[batch] = {f"{k} {p}": {"rate": rate[(k, p)], "peak_mib": peak[(k, p)]} for k, p in VARIANTS}
        print(f"| {batch} | {rate[('ours', 'fp32')]:.2f} | {rate[('ours', 'bf16')]:.2f} | {rate[('timm', 'fp32')]:.2f} "
              f"| {rate[('timm', 'bf16')]:.2f} | {rate[('ours', 'bf16')] / rate[('ours', 'fp32')]:.2f}x "
              f"| {rate[('ours', 'bf16')] / rate[('timm', 'bf16')]:.2f}x "
              f"| {peak[('ours', 'fp32')]:.0f} / {peak[('ours', 'bf16')]:.0f} "
              f"| {peak[('timm', 'fp32')]:.0f} / {peak[('timm', 'bf16')]:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_line(), "args": vars(args), "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
