"""An export made ready to run: loaded with one-line errors, padded (``channel_multiple``), converted to bfloat16
(``amp``) and fused by oneDNN, each where it applies. ``score``, ``predict``, ``benchmark`` and ``xception-deploy``
load through here; the files on disk are never changed (they keep the paper's shapes).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass

import mxnet as mx

from .cpuinfo import BLOCKED_CHANNELS, auto_channel_multiple, cpu_flags
from .errors import UserError
from .model import MIN_INPUT_SIZE
from .pad_export import pad_export
from .runfolder import numbered_files

__all__ = ["Speedups", "Ready", "load_exported", "can_fuse", "ready"]

log = logging.getLogger("xception_mx.inference")

#: ``--channel-multiple auto`` at load means what it means in training (``cpuinfo.auto_channel_multiple``): on CPU
#: every path measured as fast or faster padded (bfloat16 1.55x, fused fp32 1.05-1.14x; benchmarks/README.md).


@dataclass(frozen=True)
class Speedups:
    """How to run an export: ``fuse`` (oneDNN graph fusion on CPU), ``amp`` ('off' or 'bfloat16'),
    ``channel_multiple`` ('auto' or a positive int)."""

    fuse: bool = True
    amp: str = "off"
    channel_multiple: int | str = "auto"

    def multiple(self, ctx: list[mx.Context]) -> int:
        if self.channel_multiple != "auto":
            return int(self.channel_multiple)
        return auto_channel_multiple(any(c.device_type != "cpu" for c in ctx))


@dataclass(frozen=True)
class Ready:
    """A loaded network and what was done to it."""

    net: mx.gluon.HybridBlock
    num_classes: int
    fused: bool
    amp: str
    channel_multiple: int

    def describe(self) -> dict:
        return {"num_classes": self.num_classes, "fused": self.fused, "amp": self.amp,
                "channel_multiple": self.channel_multiple}


def _files(prefix: str, epoch: int) -> tuple[str, str]:
    symbol_file, params_file = f"{prefix}-symbol.json", f"{prefix}-{epoch:04d}.params"
    if not os.path.isfile(symbol_file):
        raise UserError(f"{symbol_file} not found: --model-prefix must name the files PREFIX-symbol.json and "
                         f"PREFIX-NNNN.params (without the suffixes)")
    if not os.path.isfile(params_file):
        have = ", ".join(str(e) for e in numbered_files(prefix, ".params")) or "none"
        raise UserError(f"{params_file} not found; epochs that exist for {prefix}: {have}")
    for path in (symbol_file, params_file):
        if os.path.getsize(path) == 0:
            raise UserError(f"{path} is empty (0 bytes): the export was cut short; use another epoch")
    return symbol_file, params_file


#: The first 8 bytes of an ``mx.nd.save`` file (``kMXAPINDArrayListMagic``, little-endian uint64).
_PARAMS_MAGIC = (0x112).to_bytes(8, "little")


def load_exported(prefix: str, epoch: int, ctx: list[mx.Context], channel_multiple: int = 1) -> mx.gluon.SymbolBlock:
    """An export as a ``SymbolBlock``, at widths rounded up to ``channel_multiple`` (:func:`pad_export`; a graph it
    cannot pad loads as it is, with a log line), with one-line errors for missing or mismatched files."""
    symbol_file, params_file = _files(prefix, epoch)
    with open(symbol_file, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if '"SoftmaxOutput"' in text:
        raise UserError(f"{symbol_file} is a softmax-head export (for MXNet's Module tools): use the export it was "
                        f"made from")
    with open(params_file, "rb") as f:
        if f.read(8) != _PARAMS_MAGIC:
            raise UserError(f"{params_file} is not an MXNet params file (a pickle or another framework's file?): "
                            f"give the PREFIX-NNNN.params that HybridBlock.export or the trainer wrote")
    partitioned = "_sg_mkldnn" in text  # an INT8 (or already fused) export: nothing to pad or fuse
    bfloat16 = '"amp_cast"' in text and not partitioned  # xception-deploy bfloat16: padded, never fused
    why_not = "an INT8 or fused graph" if partitioned and channel_multiple > 1 else None
    try:
        with warnings.catch_warnings():  # MXNet warns that it cannot infer the input type before the first call
            warnings.simplefilter("ignore")
            symbol, params = mx.sym.load(symbol_file), mx.nd.load(params_file)
            if not isinstance(params, dict):
                raise ValueError("the params file holds a list, not named arrays")
            if not partitioned:
                symbol, params, why_not = pad_export(symbol, params, channel_multiple)
            net = mx.gluon.SymbolBlock(symbol, mx.sym.var("data"))
            net.collect_params().load_dict(params, ctx=ctx, cast_dtype=True, dtype_source="saved")  # INT8 arrays
    except (AssertionError, mx.base.MXNetError, ValueError, KeyError, TypeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{params_file} does not match {symbol_file} ({detail[:200]}): use the params file "
                         f"exported with that symbol") from None
    if why_not:
        log.info("%s is not padded (%s): it runs at its own widths", symbol_file, why_not)
    net.partitioned, net.bfloat16 = partitioned, bfloat16
    net.channel_multiple = 1 if why_not else channel_multiple
    return net


def can_fuse(ctx: list[mx.Context]) -> bool:
    """oneDNN graph fusion applies: CPU contexts and an MXNet build with oneDNN (MKLDNN)."""
    return all(c.device_type == "cpu" for c in ctx) and mx.runtime.Features().is_enabled("MKLDNN")


def _probe(net, data_shape: tuple[int, int, int], ctx: mx.Context) -> int:
    """Run one zero image through the net: checks the shape and returns the number of classes."""
    if data_shape[1] < MIN_INPUT_SIZE or data_shape[2] < MIN_INPUT_SIZE:
        raise UserError(f"--data-shape {','.join(map(str, data_shape))}: Xception needs at least "
                         f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels")
    try:
        out = net(mx.nd.zeros((1, *data_shape), ctx=ctx))
        out.wait_to_read()
    except mx.base.MXNetError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"--data-shape {','.join(map(str, data_shape))} does not fit the model ({first})") from None
    if out.ndim != 2:
        raise UserError(f"the model's output has shape {out.shape}, expected (batch, classes)")
    return out.shape[1]


def check_bfloat16(ctx: list[mx.Context]) -> None:
    """bfloat16 inference runs on CPUs with avx512_bf16 (elsewhere oneDNN would emulate it, slower than fp32)."""
    if any(c.device_type != "cpu" for c in ctx):
        raise UserError("--amp bfloat16 is for CPU contexts; on GPUs score in fp32 (drop --gpus or --amp)")
    if "avx512_bf16" not in cpu_flags():
        raise UserError("--amp bfloat16: this CPU lacks bfloat16 instructions (no avx512_bf16 in /proc/cpuinfo); "
                        "score in fp32 (--amp off)")


def to_bfloat16(net: mx.gluon.HybridBlock, ctx: mx.Context) -> mx.gluon.SymbolBlock:
    """``amp.convert_hybrid_block`` to bfloat16 (``net`` hybridized and traced); depthwise convolutions whose width
    is not a multiple of 16 stay float32 (the reason is in :mod:`xception_mx.precision`)."""
    from mxnet.contrib import amp

    graph = json.loads(net._cached_graph[1].tojson())
    unblocked = [n["name"] for n in graph["nodes"] if n["op"] == "Convolution"
                 and int(n["attrs"].get("num_group", "1")) > 1 and int(n["attrs"]["num_filter"]) % BLOCKED_CHANNELS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return amp.convert_hybrid_block(net, target_dtype="bfloat16", excluded_sym_names=unblocked, ctx=ctx)


def ready(prefix: str, epoch: int, ctx: list[mx.Context], data_shape: tuple[int, int, int],
          speedups: Speedups = Speedups()) -> Ready:  # noqa: B008 (frozen)
    """Load, check against ``data_shape``, pad, convert and fuse: the network score/predict/benchmark run."""
    if speedups.amp == "bfloat16":
        check_bfloat16(ctx)
    net = load_exported(prefix, epoch, ctx, speedups.multiple(ctx))
    num_classes = _probe(net, data_shape, ctx[0])
    multiple, partitioned = net.channel_multiple, net.partitioned
    if net.bfloat16:  # already bfloat16 on disk (xception-deploy bfloat16)
        if "avx512_bf16" not in cpu_flags():
            log.warning("%s is a bfloat16 export and this CPU lacks avx512_bf16: it runs emulated, slower than "
                        "fp32", prefix)
        net.hybridize(static_alloc=True)
        return Ready(net, num_classes, False, "bfloat16", multiple)
    if speedups.amp == "bfloat16" and not partitioned:
        net.hybridize(static_alloc=True)
        net(mx.nd.zeros((1, *data_shape), ctx=ctx[0]))
        net = to_bfloat16(net, ctx[0])
        partitioned = False
    net.hybridize(static_alloc=True)
    fused = speedups.fuse and can_fuse(ctx) and not partitioned and speedups.amp == "off"
    if fused:
        net.optimize_for(mx.nd.zeros((1, *data_shape), ctx=ctx[0]), backend="MKLDNN", static_alloc=True)
    return Ready(net, num_classes, fused, speedups.amp if not partitioned else "off", multiple)
