#!/usr/bin/env python
"""Training samples/s of 1 worker against 2 workers (dist_sync + 1 server; Horovod over gloo) on loopback.

    .venv/bin/python benchmarks/bench_dist.py --steps 20 --warmup 3

Each configuration trains the same small Xception (slim topology, narrow widths, 72 px, 4 classes) on synthetic
batches (no decoding) with the same global batch, through xception_mx.distributed (the trainer's code path): the
global batch is split over the workers, gradients are summed by the server (or allreduced by Horovod), and the
per-step stop vote the trainer does is included. Every process is started by xception_mx.launch (127.0.0.1 only)
under a timeout. OMP_NUM_THREADS = cores / workers, so every configuration uses the same cores. Prints a Markdown
table; img/s = global batch x timed steps / wall time of the timed steps on rank 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> None:
    """One process: build, sync, warm up, then time ``steps`` training steps; rank 0 writes the figures."""
    import mxnet as mx
    import numpy as np
    from mxnet import gluon

    from xception_mx.distributed import create_cluster
    from xception_mx.registry import get_model
    from xception_mx.step import train_step

    cluster = create_cluster(args.kv_store, 1)
    local = cluster.local_batch(args.batch_size, 1)
    mx.random.seed(0)
    net = get_model("xception_slim", num_classes=4, filter_list=tuple(args.filters), dropout=0.0)
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = cluster.make_trainer(net.collect_params(), "nag", {"learning_rate": 0.01, "momentum": 0.9})
    if cluster.distributed:
        cluster.sync_initial(trainer, net.collect_params())
    rng = np.random.RandomState(cluster.rank)
    x = mx.nd.array(rng.standard_normal((local, 3, args.size, args.size)).astype(np.float32))
    y = mx.nd.array(rng.randint(0, 4, local).astype(np.float32))
    loss = gluon.loss.SoftmaxCrossEntropyLoss()

    def step():
        outputs, losses = train_step(net, trainer, loss, x, y, [mx.cpu()], cluster.step_size(args.batch_size))
        losses[0].asnumpy()  # the trainer reads the losses every step
        cluster.any(False)   # and votes on stopping

    for _ in range(args.warmup):
        step()
    cluster.barrier()
    start = time.time()
    for _ in range(args.steps):
        step()
    mx.nd.waitall()
    elapsed = time.time() - start
    cluster.barrier()
    if cluster.rank == 0:
        with open(args.out, "w") as f:
            json.dump({"workers": cluster.size, "elapsed": elapsed,
                       "images_per_sec": args.batch_size * args.steps / elapsed}, f)


def run_config(name: str, launch_args: list[str], kv_store: str, workers: int, args) -> dict:
    cores = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // workers)),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MXNET_ENGINE_TYPE", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        inner = [os.path.abspath(__file__), "--worker", "--kv-store", kv_store, "--out", out,
                 "--batch-size", str(args.batch_size), "--size", str(args.size), "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--filters", ",".join(map(str, args.filters))]
        if launch_args:
            cmd = [sys.executable, "-m", "xception_mx.launch", "--timeout", str(args.timeout), *launch_args, "--",
                   *inner]
        else:
            cmd = [sys.executable, *inner]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout + 60)
        if proc.returncode != 0 or not os.path.isfile(out):
            sys.exit(f"bench_dist.py: error: {name} failed (exit code {proc.returncode}): "
                     f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}")
        with open(out) as f:
            result = json.load(f)
    result.update(name=name, omp=max(1, cores // workers))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (default 32)")
    parser.add_argument("--size", type=int, default=72)
    parser.add_argument("--filters", default="16,16,32,32,48,48,64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--no-horovod", action="store_true", help="skip the Horovod row")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kv-store", default="device", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.filters = [int(v) for v in str(args.filters).split(",")]
    if args.worker:
        worker(args)
        return 0
    rows = [run_config("1 process (kv device)", [], "device", 1, args),
            run_config("2 workers + 1 server (dist_sync)", ["-n", "2", "-s", "1"], "dist_sync", 2, args)]
    if not args.no_horovod:
        rows.append(run_config("2 processes (horovod, gloo)", ["--horovod", "-n", "2"], "horovod", 2, args))
    base = rows[0]["images_per_sec"]
    print(f"xception_slim widths {','.join(map(str, args.filters))}, {args.size} px, global batch {args.batch_size}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, synthetic data, {os.cpu_count()} cores")
    print("| configuration | OMP threads per process | img/s | vs 1 process |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['omp']} | {r['images_per_sec']:.1f} | {r['images_per_sec'] / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
