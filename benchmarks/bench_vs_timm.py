"""Training-step and inference img/s of our hybridized models against timm's (channels_last), one process per
measurement, ours and timm's alternating model by model.

    .venv/bin/python benchmarks/bench_vs_timm.py --models xception41,xception65,xception71 --size 299 --batch-size 16

timm runs in the reference venv (``XCEPTION_MX_REF_PYTHON``, default ``.venv-ref/bin/python``; built by
``scripts/setup_ref_venv.sh``), since torch and gluoncv cannot share one. A training step is forward + backward +
SGD-momentum update; inference is a forward pass in eval mode. Medians over ``--repeats`` timed steps after
``--warmup`` untimed ones. Prints a Markdown table headed by the CPU model and its SIMD flags.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_PYTHON = os.environ.get("XCEPTION_MX_REF_PYTHON", os.path.join(ROOT, ".venv-ref", "bin", "python"))
#: timm's names for ours where they differ.
TIMM_NAMES = {"xception": "legacy_xception"}

sys.path.insert(0, ROOT)
from xception_mx.cpuinfo import cpu_line  # noqa: E402  (stdlib only: the reference venv's workers import it too)


def _median_rate(step, batch: int, warmup: int, repeats: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def worker_ours(model: str, size: int, batch: int, warmup: int, repeats: int) -> dict:
    sys.path.insert(0, ROOT)
    import mxnet as mx
    from mxnet import autograd, gluon

    from xception_mx import get_model

    mx.random.seed(0)
    net = get_model(model)
    net.initialize(ctx=mx.cpu())
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    x = mx.nd.random.uniform(-1, 1, shape=(batch, 3, size, size))
    y = mx.nd.array([i % 1000 for i in range(batch)])

    def train():
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(batch)

    out = {"train": _median_rate(train, batch, warmup, repeats, mx.nd.waitall)}
    out["inference"] = _median_rate(lambda: net(x), batch, warmup, repeats, mx.nd.waitall)
    out["version"] = f"mxnet {mx.__version__}"
    return out


def worker_timm(model: str, size: int, batch: int, warmup: int, repeats: int) -> dict:
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
        loss_fn(net(x), y).backward()
        opt.step()

    net.train()
    out = {"train": _median_rate(train, batch, warmup, repeats, lambda: None)}
    net.eval()
    with torch.no_grad():
        out["inference"] = _median_rate(lambda: net(x), batch, warmup, repeats, lambda: None)
    out["version"] = f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads"
    return out


def _run(python: str, kind: str, model: str, args) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", kind, "--models", model, "--size", str(args.size),
           "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"bench_vs_timm: the {kind} run of {model} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="xception41,xception65,xception71")
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["ours", "timm"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.worker:
        work = worker_ours if args.worker == "ours" else worker_timm
        print(json.dumps(work(args.models, args.size, args.batch_size, args.warmup, args.repeats)))
        return 0
    if not os.access(REF_PYTHON, os.X_OK):
        raise SystemExit(f"bench_vs_timm: no reference venv at {REF_PYTHON}: run bash scripts/setup_ref_venv.sh")
    print(f"# {cpu_line()}; {args.size} px, batch {args.batch_size}, median of {args.repeats} after {args.warmup}")
    rows = {}
    for model in args.models.split(","):
        rows[model] = {"ours": _run(sys.executable, "ours", model, args), "timm": _run(REF_PYTHON, "timm", model, args)}
    print(f"# ours: {rows[model]['ours']['version']}, hybridized; timm: {rows[model]['timm']['version']}, "
          f"channels_last")
    print("| model | train img/s ours | train img/s timm | ours/timm | inference img/s ours | inference img/s timm "
          "| ours/timm |\n|---|---|---|---|---|---|---|")
    for model, r in rows.items():
        o, t = r["ours"], r["timm"]
        print(f"| {model} | {o['train']:.2f} | {t['train']:.2f} | {o['train'] / t['train']:.2f}x | "
              f"{o['inference']:.2f} | {t['inference']:.2f} | {o['inference'] / t['inference']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_line(), "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
