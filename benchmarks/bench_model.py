"""Images/s of an Xception training step (forward, backward, SGD update) and of inference, imperative vs hybridized.

    python benchmarks/bench_model.py --model xception --size 299 --batch-size 16

Prints a Markdown table (min and median over --repeats timed runs after --warmup untimed ones) and, with --json,
writes the raw timings. Timings are synchronised with ``mx.nd.waitall()``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import mxnet as mx
from mxnet import autograd, gluon

from xception_mx import get_model, list_models


def _time_runs(step, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    mx.nd.waitall()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        mx.nd.waitall()
        times.append(time.perf_counter() - start)
    return times


def bench(model: str, size: int, batch_size: int, hybridize: bool, warmup: int, repeats: int,
          ctx: mx.Context) -> dict:
    mx.random.seed(0)
    net = get_model(model)
    net.initialize(ctx=ctx)
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    x = mx.nd.random.uniform(-1, 1, shape=(batch_size, 3, size, size), ctx=ctx)
    y = mx.nd.array([i % 1000 for i in range(batch_size)], ctx=ctx)

    def train_step():
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(batch_size)

    def infer_step():
        net(x).wait_to_read()

    result = {}
    for kind, step in (("train", train_step), ("inference", infer_step)):
        times = _time_runs(step, warmup, repeats)
        result[kind] = {"times_s": times, "img_s_median": batch_size / statistics.median(times),
                        "img_s_best": batch_size / min(times), "ms_batch_median": 1000 * statistics.median(times)}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="xception", choices=list_models())
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write raw timings here")
    args = parser.parse_args(argv)
    ctx = mx.cpu()
    threads = {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "MXNET_CPU_WORKER_NTHREADS")}
    print(f"# {args.model} {args.size}px batch {args.batch_size}, warm-up {args.warmup}, repeats {args.repeats}, "
          f"mxnet {mx.__version__} oneDNN={mx.runtime.Features().is_enabled('MKLDNN')}, {os.cpu_count()} cores "
          f"({platform.processor() or platform.machine()}), threads {threads}")
    rows = {}
    for hybridize in (False, True):
        mode = "hybridized (static_alloc, static_shape)" if hybridize else "imperative"
        rows[mode] = bench(args.model, args.size, args.batch_size, hybridize, args.warmup, args.repeats, ctx)
    print("| mode | train img/s (median) | train img/s (best) | inference img/s (median) | inference img/s (best) |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['train']['img_s_median']:.2f} | {r['train']['img_s_best']:.2f} | "
              f"{r['inference']['img_s_median']:.2f} | {r['inference']['img_s_best']:.2f} |")
    imp, hyb = rows["imperative"], rows["hybridized (static_alloc, static_shape)"]
    print(f"hybridized/imperative: train {hyb['train']['img_s_median'] / imp['train']['img_s_median']:.2f}x, "
          f"inference {hyb['inference']['img_s_median'] / imp['inference']['img_s_median']:.2f}x (medians)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "threads": threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
