"""bfloat16 AMP training step of our Xception against fp32 (and timm), alternating persistent worker processes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_amp.py --batch-size 16 --steps 3 \
        --variants fp32,bf16,bf16_amx_dwfp32,timm_fp32,timm_bf16 --profile fp32,bf16_amx_dwfp32

Every variant is one worker process (the environment, the AMX permission and ``amp.init`` are per process). Each
worker builds its net and runs ``--warmup`` untimed steps, then the parent asks the workers for one timed step each in
turn (A, B, C, A, B, C, ...), so all variants see the same machine load; img/s is the median over ``--steps``.
A training step is forward + backward + SGD-momentum update (``amp.init_trainer`` on the bf16 variants).

Variants (ours): ``fp32``; ``bf16`` (``amp.init(target_dtype='bfloat16')``); suffixes ``_amx`` (arch_prctl
ARCH_REQ_XCOMP_PERM for AMX tile data before MXNet loads, and ``DNNL_MAX_CPU_ISA=AVX512_CORE_AMX``), ``_dwfp32``
(depthwise convs kept in fp32 through ``amp.init(conditional_fp32_ops=...)``), ``_dwpatch`` (depthwise convs kept in
fp32 by a wrapper that casts their input once, instead of amp's bf16-then-fp32 double cast), ``_dw728`` (only the
728-channel depthwise convs in fp32 via conditional_fp32_ops), ``_dwp728`` (the same by the wrapper), ``_b3fp32``
(block3's convs in fp32 by the wrapper), ``_relu`` (F.relu as Activation(act_type='relu'), which has a oneDNN bf16
kernel), ``_noscale`` (no dynamic loss scaler after ``amp.init_trainer``: bf16 needs none), ``_nobn`` (BatchNorm in
fp32 ops), ``_w736`` (what-if: 736 instead of 728 middle-flow channels, so oneDNN's blocked kernels fit MXNet's
unpadded buffers; not the paper's network), ``_m16`` (``channel_multiple=16``: the paper's network at padded widths,
what ``--channel-multiple auto`` trains on CPUs). timm (reference venv): ``timm_fp32``,
``timm_bf16`` (``torch.autocast('cpu', torch.bfloat16)``), channels_last.

``--profile`` names variants to profile after timing: an MXNet aggregate-stats table of one step (top operators,
amp casts, depthwise vs other convs) and, with DNNL_VERBOSE in a separate step, oneDNN time per implementation.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_PYTHON = os.environ.get("XCEPTION_MX_REF_PYTHON", os.path.join(ROOT, ".venv-ref", "bin", "python"))
#: Depthwise group counts of the paper's Xception (one filter per channel).
DW_GROUPS = (64, 128, 256, 728, 1024, 1536)
AMX_ENV = {"DNNL_MAX_CPU_ISA": "AVX512_CORE_AMX"}


def request_amx_permission() -> int:
    """Linux >= 5.16 needs arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) before a process may use AMX tiles."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18)  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA


def _reply(obj) -> None:
    sys.stderr.write("@@" + json.dumps(obj) + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------------------- ours
def build_ours(variant: str, batch: int, size: int):
    import mxnet as mx
    from mxnet import autograd, gluon

    sys.path.insert(0, ROOT)
    from xception_mx import get_model

    bf16 = variant.startswith("bf16")
    if bf16:
        from mxnet.contrib import amp

        orig_conv = mx.sym.Convolution
        kwargs = {}
        if "_dwfp32" in variant or "_dw728" in variant:
            groups = [728] if "_dw728" in variant else list(DW_GROUPS)
            kwargs["conditional_fp32_ops"] = [("Activation", "act_type", ["softrelu"]),
                                              ("Convolution", "num_group", groups)]
        if "_nobn" in variant:
            from mxnet.contrib.amp.lists import symbol_bf16

            kwargs["fp32_ops"] = symbol_bf16.FP32_FUNCS + ["BatchNorm"]
        amp.init(target_dtype="bfloat16", **kwargs)
        if "_dwpatch" in variant or "_dwp728" in variant or "_b3fp32" in variant:
            amp_conv = mx.sym.Convolution
            fp32_groups = (728,) if "_dwp728" in variant else DW_GROUPS if "_dwpatch" in variant else ()

            def in_block3() -> bool:
                # Gluon names block3 'xceptionblock2' (counters start at 0); its 1x1 convs run at 37x37 with 728
                # channels, where oneDNN's plain-layout bf16 gemm convolution is slow.
                prefix = getattr(mx.name.NameManager.current, "_prefix", "")
                return "_b3fp32" in variant and "xceptionblock2_" in prefix

            def conv(*args, **kw):
                if kw.get("num_group", 1) in fp32_groups or in_block3():
                    args = [mx.sym.amp_cast(a, dtype="float32") if isinstance(a, mx.sym.Symbol) else a for a in args]
                    kw = {k: mx.sym.amp_cast(v, dtype="float32") if isinstance(v, mx.sym.Symbol) else v
                          for k, v in kw.items()}
                    return orig_conv(*args, **kw)
                return amp_conv(*args, **kw)

            mx.sym.Convolution = conv
            mx.sym.op.Convolution = conv
        if "_relu" in variant:
            # F.relu (the stem, conv3, conv4) has no oneDNN bf16 kernel; Activation(act_type='relu') does.
            def relu(data=None, name=None, **kw):
                return mx.sym.Activation(data, act_type="relu", name=name)

            mx.sym.relu = relu
            mx.sym.op.relu = relu
    mx.random.seed(0)
    # ``_w736``: a what-if with 736 middle-flow channels (a multiple of 16, not the paper's 728).
    widths = {"filter_list": (64, 128, 256, 736, 1024, 1536, 2048)} if "_w736" in variant else {}
    if "_m16" in variant:  # the product's padded widths (channel_multiple 16): every depthwise conv in bf16
        widths["channel_multiple"] = 16
    net = get_model("xception", **widths)
    net.initialize(ctx=mx.cpu())
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9})
    if bf16:
        amp.init_trainer(trainer)
        if "_noscale" in variant:
            # bf16 has fp32's exponent range: no dynamic loss scaling, so no multi_all_finite + asnumpy() per step.
            trainer._amp_loss_scaler = None
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    x = mx.nd.random.uniform(-1, 1, shape=(batch, 3, size, size))
    y = mx.nd.array([i % 1000 for i in range(batch)])

    def step():
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(batch)
        mx.nd.waitall()

    def profile(path):
        mx.profiler.set_config(profile_all=True, aggregate_stats=True, filename=path)
        mx.profiler.set_state("run")
        step()
        mx.profiler.set_state("stop")
        return mx.profiler.dumps(reset=True)

    return step, profile, f"mxnet {mx.__version__}"


# ---------------------------------------------------------------------------------------------------------------- timm
def build_timm(variant: str, batch: int, size: int):
    import contextlib

    import timm
    import torch

    torch.manual_seed(0)
    net = timm.create_model("legacy_xception", pretrained=False).to(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = (torch.rand(batch, 3, size, size) * 2 - 1).to(memory_format=torch.channels_last)
    y = torch.arange(batch) % 1000
    loss_fn = torch.nn.CrossEntropyLoss()
    bf16 = variant == "timm_bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    def profile(path):
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)

    return step, profile, f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads"


def worker(variant: str, batch: int, size: int, warmup: int) -> int:
    """Build, warm up, then answer commands on stdin: ``step``, ``profile PATH``, ``mark``, ``quit``."""
    info = {}
    if "_amx" in variant:
        info["arch_prctl"] = request_amx_permission()
    build = build_timm if variant.startswith("timm") else build_ours
    step, profile, version = build(variant, batch, size)
    for _ in range(warmup):
        step()
    _reply({"ready": True, "version": version, **info})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "step":
            start = time.perf_counter()
            step()
            _reply({"time": time.perf_counter() - start})
        elif cmd[0] == "profile":
            _reply({"table": profile(cmd[1])})
        elif cmd[0] == "mark":
            sys.stdout.write("@@MARK\n")
            sys.stdout.flush()
            _reply({"ok": True})
    _reply({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    return 0


# -------------------------------------------------------------------------------------------------------------- parent
class Worker:
    def __init__(self, variant: str, args, verbose_log: str | None = None, extra_env: dict | None = None):
        self.variant = variant
        env = dict(os.environ, **(extra_env or {}))
        if "_amx" in variant:
            env.update(AMX_ENV)
        if verbose_log:
            env["DNNL_VERBOSE"] = "1"
        python = REF_PYTHON if variant.startswith("timm") else sys.executable
        cmd = [python, os.path.abspath(__file__), "--worker", variant, "--batch-size", str(args.batch_size),
               "--size", str(args.size), "--warmup", str(args.warmup)]
        self.stdout = open(verbose_log, "w") if verbose_log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self.stdout, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=env)
        self.stderr_tail: list[str] = []

    def read(self) -> dict:
        for line in self.proc.stderr:
            if line.startswith("@@"):
                return json.loads(line[2:])
            self.stderr_tail = (self.stderr_tail + [line])[-30:]
        raise SystemExit(f"profile_amp: worker {self.variant} died (rc {self.proc.wait()}):\n"
                         + "".join(self.stderr_tail))

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self.read()
        self.proc.wait()
        return out


def parse_mx_table(table: str) -> list[tuple[str, int, float]]:
    """(name, count, total ms) rows of the 'operator' section of an MXNet aggregate-stats table."""
    rows, section = [], None
    lines = table.splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if i + 1 < len(lines) and lines[i + 1].startswith("===="):
            section = s
            continue
        parts = s.split()
        if section == "operator" and len(parts) >= 6:
            try:
                count, total = int(parts[-5]), float(parts[-4])
            except ValueError:
                continue
            rows.append((" ".join(parts[:-5]), count, total))
    return sorted(rows, key=lambda r: -r[2])


def summarize_mx(rows, top: int) -> str:
    total = sum(r[2] for r in rows)
    out = ["| operator | calls | ms | share |", "|---|---|---|---|"]
    for name, count, ms in rows[:top]:
        out.append(f"| {name} | {count} | {ms:.0f} | {100 * ms / total:.1f}% |")
    groups = {"amp_cast/amp_multicast": ("amp_cast", "amp_multicast", "_backward_amp_cast",
                                         "_backward_amp_multicast"),
              "Convolution (fwd+bwd)": ("Convolution", "_backward_Convolution"),
              "BatchNorm (fwd+bwd)": ("BatchNorm", "_backward_BatchNorm"),
              "optimizer updates": ("sgd_mom_update", "mp_sgd_mom_update", "multi_sgd_mom_update",
                                    "multi_mp_sgd_mom_update", "preloaded_multi_sgd_mom_update",
                                    "preloaded_multi_mp_sgd_mom_update")}
    out.append(f"| **sum of all operators** | | {total:.0f} | 100% |")
    for label, names in groups.items():
        ms = sum(r[2] for r in rows if r[0] in names)
        out.append(f"| *{label}* | | {ms:.0f} | {100 * ms / max(total, 1e-9):.1f}% |")
    return "\n".join(out)


def summarize_verbose(path: str, top: int) -> str:
    """oneDNN exec time of the marked step by (primitive, implementation, prop_kind), and by depthwise or not."""
    agg: dict[tuple, list] = {}
    seen_mark = False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("@@MARK"):
                seen_mark, agg = True, {}
                continue
            if not seen_mark or not line.startswith("dnnl_verbose,exec"):
                continue
            p = line.rstrip().split(",")
            try:
                ms = float(p[-1])
            except ValueError:
                continue
            prim, impl, prop = p[3], p[4], p[5]
            if prim == "convolution":
                prim = "conv dw" if _is_depthwise(p[-2]) else "conv"
            elif prim == "reorder":
                prop = p[6].split()[0].split(":")[0] + "->" + p[6].split()[-1].split(":")[0]
            key = (prim, impl, prop)
            e = agg.setdefault(key, [0, 0.0])
            e[0] += 1
            e[1] += ms
    total = sum(v[1] for v in agg.values())
    out = ["| oneDNN primitive | implementation | kind | calls | ms | share |", "|---|---|---|---|---|---|"]
    for (prim, impl, prop), (n, ms) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
        out.append(f"| {prim} | {impl} | {prop} | {n} | {ms:.0f} | {100 * ms / max(total, 1e-9):.1f}% |")
    out.append(f"| **all** | | | {sum(v[0] for v in agg.values())} | {total:.0f} | 100% |")
    for label in ("conv", "conv dw", "reorder", "batch_normalization"):
        ms = sum(v[1] for k, v in agg.items() if k[0] == label)
        out.append(f"| *{label} total* | | | | {ms:.0f} | {100 * ms / max(total, 1e-9):.1f}% |")
    return "\n".join(out)


def _is_depthwise(desc: str) -> bool:
    # e.g. "mb16_g728ic728oc728_ih19..."
    import re

    m = re.match(r"g(\d+)mb\d+_ic(\d+)oc(\d+)", desc)
    return bool(m) and m.group(1) == m.group(2) == m.group(3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="fp32,bf16,bf16_amx,bf16_amx_dwpatch,timm_fp32,timm_bf16")
    parser.add_argument("--profile", default="", help="comma list of variants to profile after timing")
    parser.add_argument("--verbose-profile", default="", help="comma list of variants for a DNNL_VERBOSE step")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between steps (OpenMP spin-down)")
    parser.add_argument("--parallel-start", type=int, default=2, help="workers built at once")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.batch_size, args.size, args.warmup)

    variants = [v for v in args.variants.split(",") if v]
    print(f"# batch {args.batch_size}, {args.size} px, median of {args.steps} alternating steps after "
          f"{args.warmup} warm-ups, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    workers, info = {}, {}
    for i in range(0, len(variants), args.parallel_start):  # building is slow: a few at a time
        batch = [Worker(v, args) for v in variants[i:i + args.parallel_start]]
        for w in batch:
            info[w.variant] = w.read()
            workers[w.variant] = w
            print(f"# {w.variant}: ready ({info[w.variant]})", flush=True)
    times = {v: [] for v in variants}
    for _ in range(args.steps):
        for v in variants:
            time.sleep(args.pause)
            times[v].append(workers[v].ask("step")["time"])
    rss = {v: workers[v].close()["maxrss_mb"] for v in variants}
    tables = {}
    for v in [v for v in args.profile.split(",") if v]:
        # A fresh worker without engine bulking (bulked segments hide the operators) after the timing.
        w = Worker(v, args, extra_env={"MXNET_EXEC_BULK_EXEC_TRAIN": "0", "MXNET_EXEC_BULK_EXEC_INFERENCE": "0"})
        w.read()
        tables[v] = w.ask(f"profile /tmp/profile_amp_{v}.json")["table"]
        w.close()

    rate = {v: args.batch_size / statistics.median(times[v]) for v in variants}
    base = rate.get("fp32")
    tbase = rate.get("timm_bf16")
    print("\n| variant | img/s | vs our fp32 | vs timm bf16 | step times (s) | peak RSS MB |\n"
          "|---|---|---|---|---|---|")
    for v in variants:
        rel = f"{rate[v] / base:.2f}x" if base else "-"
        trel = f"{rate[v] / tbase:.2f}x" if tbase else "-"
        print(f"| {v} | {rate[v]:.2f} | {rel} | {trel} | {' '.join(f'{t:.2f}' for t in times[v])} | {rss[v]:.0f} |")
    for v, table in tables.items():
        print(f"\n## profile of one step: {v}\n")
        print(table if v.startswith("timm") else summarize_mx(parse_mx_table(table), args.top))
    for v in [v for v in args.verbose_profile.split(",") if v]:
        log = f"/tmp/profile_amp_verbose_{v}.log"
        w = Worker(v, args, verbose_log=log)
        w.read()
        w.ask("mark")
        w.ask("step")
        w.close()
        print(f"\n## oneDNN verbose of one step: {v} ({log})\n")
        print(summarize_verbose(log, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "info": info, "times": times, "rate": rate, "rss_mb": rss,
                       "tables": tables}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
