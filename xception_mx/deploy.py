"""``xception-deploy`` (``python -m xception_mx.deploy``): an export made faster or portable.

- ``int8``: oneDNN INT8 through MXNet's ``quantize_net`` (calibrated on our validation iterator) -> a new export
  (``PREFIX-symbol.json`` + ``PREFIX-0000.params``) that ``score.py --epoch 0`` scores like any other;
- ``onnx``: ``mx.onnx.export_model`` -> ``model.onnx`` with the preprocessing protocol in its metadata, checked
  against MXNet with onnxruntime by the command itself;
- ``bfloat16``: ``amp.convert_model`` -> an export whose weights and layers are bfloat16 (half the file), at the
  paper's widths like every export; ``score.py`` pads it when it loads, which is what makes it fast (README);
- ``softmax-head``: the export with ``SoftmaxOutput(name='softmax')`` appended, for MXNet's Module-API tools
  (``Module.bind`` with ``softmax_label``, MXNet's example ``score.py``).

Each takes ``--model-prefix`` + ``--epoch best|last|N`` or ``--checkpoint`` (``runfolder.resolve_export``), writes
its protocol and class names (``classes.txt``; ONNX: metadata) beside its output and nothing under a final name
until it is complete.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

from .cpuinfo import cpu_flags
from .errors import RunFailed, UserError
from .runfolder import classes_file, classes_target, write_classes

__all__ = ["quantize", "quantize_int8", "export_bfloat16", "export_onnx", "add_softmax_head", "main", "ONNX_PIN",
           "ONNX_TOLERANCE"]

#: MXNet 1.9.1's exporter needs onnx.mapping (gone in onnx 1.19) and stamps onnx's newest opset, which onnxruntime
#: < 1.20 (the last beside numpy < 1.24) reads up to opset 21 and IR version 10: onnx 1.16.
ONNX_PIN = "onnx>=1.14,<1.17"
ONNX_TOLERANCE = 1e-4

log = logging.getLogger("xception_mx.deploy")


def _cpu_flags() -> set[str]:  # a seam for the tests (no VNNI)
    return cpu_flags()


def check_int8_support() -> None:
    """oneDNN runs INT8 fast only with VNNI (AVX512-VNNI or AVX-VNNI); without it, one line instead of a slow file."""
    import mxnet as mx

    if not mx.runtime.Features().is_enabled("MKLDNN"):
        raise UserError("this MXNet build has no oneDNN (MKLDNN): INT8 needs the CPU wheel mxnet==1.9.1")
    if not _cpu_flags() & {"avx512_vnni", "avx_vnni"}:
        raise UserError("this CPU has no VNNI instructions (avx512_vnni / avx_vnni in /proc/cpuinfo): oneDNN INT8 "
                        "would not be faster than fp32 here; quantize on a CPU that has them")


def _write_export(net, out_prefix: str, pre, carried: tuple) -> None:
    """``net.export`` into a temporary folder beside ``out_prefix``, then each file renamed into place (epoch 0)."""
    from .checkpoint import export_atomic

    _check_out(out_prefix)
    with _writing(out_prefix, "the export"):
        export_atomic(net, out_prefix, 0)
        pre.write(out_prefix)
        write_classes(*carried)


def _class_names(prefix: str, classes: str | None, out: str | None, input_size: int) -> tuple:
    """(target, names): the classes.txt to write beside ``out`` (``runfolder.classes_target``) and the export's
    class names (``runfolder.classes_file``; checked against the graph's classes); ``write_classes`` takes both."""
    import mxnet as mx

    from .records import read_classes

    path = classes_file(prefix, classes)
    if path is None:
        return None, None
    try:
        _, shapes, _ = mx.sym.load(f"{prefix}-symbol.json").infer_shape(data=(1, 3, input_size, input_size))
        num_classes = shapes[0][1]
    except mx.base.MXNetError:  # a graph MXNet cannot infer without running it: the count goes unchecked
        num_classes = None
    names = read_classes(path, num_classes)
    return classes_target(names, out, path) if out else None, names


def _check_out(out: str) -> None:
    """``--out``'s folder is made when the output is written (:func:`_writing`); a file in its way is refused now."""
    folder = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"--out {out}: {folder} is a file, not a folder: choose another --out")


def _writing(out: str, what: str):
    """Make ``--out``'s folder; a full disk while writing as one line naming it (what was there is untouched)."""
    from .fileio import write_errors

    folder = os.path.dirname(os.path.abspath(out))
    with write_errors(folder, f"the folder of {out}", "free space and run the command again"):
        os.makedirs(folder, exist_ok=True)
    return write_errors(folder, f"{what} {out}", "free space and run the command again (nothing earlier was changed)")


def quantize(net, calib, num_images: int, calib_mode: str = "naive"):
    """``quantize_net_v2`` (oneDNN, every layer INT8, tensor-wise scales) of an fp32 HybridBlock, calibrated on
    ``num_images`` images of the DataIter ``calib``; a hybridized SymbolBlock. Measured on the demo (see
    benchmarks/README.md): keeping the first convolution and the classifier fp32, channel-wise scales, depthwise
    convolutions in fp32 or ``smart`` mode were never more accurate; entropy calibration much less."""
    import warnings

    import mxnet as mx
    from mxnet.contrib.quantization import quantize_net_v2

    with warnings.catch_warnings():  # "Cannot decide type for ... data": the SymbolBlock's input, set by the call
        warnings.simplefilter("ignore")
        qnet = quantize_net_v2(net, quantized_dtype="auto", quantize_mode="full", calib_data=calib,
                               calib_mode=calib_mode, num_calib_examples=num_images, ctx=mx.cpu())
    qnet.hybridize(static_alloc=True, static_shape=True)
    return qnet


def quantize_int8(prefix: str, epoch: int, calib_rec: str, out_prefix: str, calib_mode: str = "naive",
                  num_calib_images: int = 512, batch_size: int = 16, classes: str | None = None) -> dict:
    """Quantize an export to INT8 with calibration batches from our validation iterator; returns a summary. The
    export is quantized at its own (the paper's) widths: padding measured no faster in INT8 (benchmarks/)."""
    import mxnet as mx

    from . import data
    from .inference import load_exported
    from .score import export_protocol

    check_int8_support()
    shards = data.find_shards(calib_rec)
    records = data.count_records(shards)
    if records == 0:
        raise UserError(f"--calib-rec {calib_rec}: the shards hold no records; give validation shards with images")
    pre = export_protocol(prefix)
    shape = (3, pre.input_size, pre.input_size)
    net = load_exported(prefix, epoch, [mx.cpu()])
    if getattr(net, "partitioned", False):
        raise UserError(f"{prefix} is already quantized or fused: quantize the fp32 export")
    carried = _class_names(prefix, classes, out_prefix, pre.input_size)
    net.hybridize(static_alloc=True)
    batch = min(batch_size, records)
    calib = data.val_iter(shards, batch, shape, crop_pct=pre.crop_pct, mean=pre.mean, std=pre.std,
                          inter_method=pre.inter_method, preprocess_threads=2)
    count = min(num_calib_images, records)
    log.info("quantizing %s-%04d to INT8: %s calibration on %d images of %s (batch %d)...", prefix, epoch,
             calib_mode, count, calib_rec, batch)
    start = time.time()
    qnet = quantize(net, calib, count, calib_mode)
    log.info("quantized in %.1fs", time.time() - start)
    qnet(mx.nd.zeros((batch, *shape)))  # traces the graph for export
    _write_export(qnet, out_prefix, pre, carried)
    return {"out": out_prefix, "calib_images": count, "calib_mode": calib_mode}


def export_bfloat16(prefix: str, epoch: int, out_prefix: str, classes: str | None = None) -> dict:
    """An fp32 export converted to bfloat16 by ``amp.convert_model`` (weights cast too, input cast inside the graph),
    written as epoch 0 and checked against fp32 on random images; returns a summary."""
    import mxnet as mx
    from mxnet.contrib import amp

    from .fileio import atomic_paths
    from .inference import check_bfloat16, load_exported
    from .score import export_protocol

    check_bfloat16([mx.cpu()])
    pre = export_protocol(prefix)
    fp32 = load_exported(prefix, epoch, [mx.cpu()])
    if fp32.partitioned or fp32.bfloat16:
        raise UserError(f"{prefix} is already quantized, fused or bfloat16: convert the fp32 export")
    carried = _class_names(prefix, classes, out_prefix, pre.input_size)
    symbol, args, aux = mx.model.load_checkpoint(prefix, epoch)
    symbol, args, aux = amp.convert_model(symbol, args, aux, target_dtype="bfloat16", cast_optional_params=True)
    # it takes fp32 images as the fp32 export does (convert_model leaves the input's cast to the caller)
    symbol = symbol(data=mx.sym.amp_cast(mx.sym.var("data"), dtype=amp.amp.bfloat16))
    _check_out(out_prefix)
    with _writing(out_prefix, "the bfloat16 export"), \
            atomic_paths(f"{out_prefix}-0000.params", f"{out_prefix}-symbol.json") as (params_tmp, symbol_tmp):
        mx.nd.save(params_tmp, {**{f"arg:{k}": v for k, v in args.items()}, **{f"aux:{k}": v for k, v in aux.items()}})
        symbol.save(symbol_tmp, remove_amp_cast=False)  # by default save() strips every amp_cast
        pre.write(out_prefix)
        write_classes(*carried)
    images = mx.nd.random.normal(shape=(4, 3, pre.input_size, pre.input_size))
    bf16 = load_exported(out_prefix, 0, [mx.cpu()], channel_multiple=16)
    want, got = fp32(images), bf16(images).astype("float32")
    return {"out": out_prefix, "max_abs_logit_diff": float((want - got).abs().max().asscalar()),
            "same_top1": int((want.argmax(axis=1) == got.argmax(axis=1)).sum().asscalar()), "images": 4}


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError(f"ONNX export needs the onnx extra: pip install -e '.[onnx]' (that is {ONNX_PIN} and "
                        f"onnxruntime)") from None
    if not hasattr(onnx, "mapping") or onnx.defs.onnx_opset_version() > 21:
        raise UserError(f"onnx {onnx.__version__} is too new (MXNet 1.9.1's exporter needs onnx.mapping and "
                        f"stamps opset {onnx.defs.onnx_opset_version()}, onnxruntime reads 21): pip install "
                        f"'{ONNX_PIN}'")
    try:
        import onnxruntime
    except ImportError:
        raise UserError("the ONNX parity check needs onnxruntime: pip install -e '.[onnx]'") from None
    return onnx, onnxruntime


def export_onnx(prefix: str, epoch: int, out_path: str, batch_size: int | None = None,
                classes: str | None = None) -> dict:
    """The export as ONNX (opset of MXNet's exporter) with a free batch dimension (``batch_size``: a fixed one), its
    protocol (and class names, when known) in the model's metadata, checked by onnxruntime against MXNet on random
    inputs of two batch sizes (the fixed one alone): RunFailed when the max |logit diff| exceeds ONNX_TOLERANCE."""
    import mxnet as mx
    import numpy as np

    from .fileio import atomic_path
    from .inference import load_exported
    from .score import export_protocol

    onnx, ort = _import_onnx()
    _check_out(out_path)
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size} (leave it out for a free batch)")
    pre = export_protocol(prefix)
    shape = (3, pre.input_size, pre.input_size)
    net = load_exported(prefix, epoch, [mx.cpu()])  # checks the files
    if net.bfloat16:
        raise UserError(f"{prefix} is a bfloat16 export, which MXNet's ONNX exporter cannot write: export the fp32 "
                        f"export it was converted from")
    _, names = _class_names(prefix, classes, None, pre.input_size)
    sym, params = f"{prefix}-symbol.json", f"{prefix}-{epoch:04d}.params"
    log.info("exporting %s-%04d to ONNX, then checking it with onnxruntime...", prefix, epoch)
    with _writing(out_path, "the ONNX model"), atomic_path(out_path) as tmp:
        kwargs = {} if batch_size else {"dynamic": True, "dynamic_input_shapes": [(None, *shape)]}
        mx.onnx.export_model(sym, params, [(batch_size or 1, *shape)], np.float32, tmp, **kwargs)
        model = onnx.load(tmp)
        weights = {init.name for init in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in weights]  # MXNet lists the weights as inputs too,
        del model.graph.input[:]  # which keeps onnxruntime from folding them
        model.graph.input.extend(inputs)
        meta = {"xception_mx.preprocess": json.dumps(pre.to_dict()), "xception_mx.source": prefix}
        if names is not None:
            meta["xception_mx.classes"] = json.dumps(names)
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, tmp)
        diff = _onnx_parity(ort, tmp, net, shape, [batch_size] if batch_size else [1, 4])
        if diff > ONNX_TOLERANCE:
            raise RunFailed(f"onnxruntime differs from MXNet by {diff:.2e} (more than {ONNX_TOLERANCE:g}): "
                            f"{out_path} not written")
    return {"out": out_path, "max_abs_logit_diff": diff, "batch_size": batch_size}


def _onnx_parity(ort, path: str, net, shape: tuple, batches: list[int]) -> float:
    """The max |logit diff| between onnxruntime and MXNet on random inputs of each batch size."""
    import mxnet as mx
    import numpy as np

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    diffs = []
    for batch in batches:
        x = np.random.RandomState(batch).uniform(-1, 1, (batch, *shape)).astype(np.float32)
        ours = net(mx.nd.array(x)).asnumpy()
        theirs = session.run(None, {session.get_inputs()[0].name: x})[0]
        diffs.append(float(np.abs(ours - theirs).max()))
    return max(diffs)


def add_softmax_head(prefix: str, epoch: int, out_prefix: str, out_epoch: int = 0, check: bool = True,
                     normalise_inside: bool = False, classes: str | None = None) -> dict:
    """The export with SoftmaxOutput(name='softmax') appended (its label input is ``softmax_label``), as
    ``out_prefix``-symbol.json + ``out_prefix``-``out_epoch``.params. ``normalise_inside``: the graph also subtracts
    the protocol's mean and divides by its std, so it takes 0-255 RGB pixels (what MXNet's example score.py feeds:
    it has ``--rgb-mean`` but no std)."""
    import mxnet as mx

    from .fileio import atomic_path, atomic_write_text
    from .inference import load_exported
    from .model import FEATURES_NAME
    from .score import export_protocol

    if check:
        load_exported(prefix, epoch, [mx.cpu()])  # one line for missing or mismatched files
    _check_out(out_prefix)
    sym = mx.sym.load(f"{prefix}-symbol.json")
    if "softmax_label" in sym.list_arguments():
        raise UserError(f"{prefix}-symbol.json already ends in a SoftmaxOutput")
    pre = export_protocol(prefix)
    carried = _class_names(prefix, classes, out_prefix, pre.input_size)
    params = mx.nd.load(f"{prefix}-{epoch:04d}.params")
    if normalise_inside:
        pixels = mx.sym.var("data")
        mean = mx.sym.var("xception_mx_mean", shape=(1, 3, 1, 1))
        std = mx.sym.var("xception_mx_std", shape=(1, 3, 1, 1))
        sym = sym(data=mx.sym.broadcast_div(mx.sym.broadcast_sub(pixels, mean), std))
        params["arg:xception_mx_mean"] = mx.nd.array(pre.mean).reshape((1, 3, 1, 1))
        params["arg:xception_mx_std"] = mx.nd.array(pre.std).reshape((1, 3, 1, 1))
        pre = dataclasses.replace(pre, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    head = mx.sym.SoftmaxOutput(data=sym, name="softmax")
    with _writing(out_prefix, "the softmax-head export"):
        with atomic_path(f"{out_prefix}-{out_epoch:04d}.params") as tmp:
            mx.nd.save(tmp, params)
        atomic_write_text(f"{out_prefix}-symbol.json", head.tojson(remove_amp_cast=False))
        pre.write(out_prefix)
        write_classes(*carried)
    features = f"{FEATURES_NAME}_output" in sym.get_internals().list_outputs()
    return {"out": out_prefix, "features_layer": f"{FEATURES_NAME}_output" if features else None}


def main(argv: list[str] | None = None) -> int:
    """``xception-deploy`` / ``python -m xception_mx.deploy``; the command line is ``deploy_cli.py``."""
    from .deploy_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
