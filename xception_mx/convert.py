"""Import pretrained Xception weights from timm (``legacy_xception``, the aligned ``xception41/65/71``) or Keras
(``applications.Xception``).

``python -m xception_mx.convert SRC OUT_PREFIX [--from timm|keras]`` (also ``xception-convert``) reads

- timm: a ``.safetensors`` file (safetensors' numpy API, no torch) or a ``.pth``/``.pt``/``.bin`` state dict (needs
  torch); old Cadene files (2-D pointwise weights, ``last_linear``) are accepted;
- Keras: the legacy HDF5 weights file (``xception_weights_tf_dim_ordering_tf_kernels.h5``: ``layer_names``,
  ``block1_conv1``, ``block2_sepconv1``, ..., ``predictions``), read with h5py; kernels are transposed from HWIO to
  MXNet's OIHW, the dense kernel from (in, out) to (out, in);

and writes, all atomically and only after every tensor was matched:

- ``OUT_PREFIX.params``: the native parameter file (``Block.save_parameters`` format: structured names such as
  ``features.conv1.weight``; an NDArray file, no pickle);
- ``OUT_PREFIX-symbol.json`` + ``OUT_PREFIX-0000.params``: MXNet's export, scoreable with ``score.py --epoch 0``;
- ``OUT_PREFIX-preprocess.json``: the weights' evaluation protocol (timm's: bicubic, crop 0.8975, [-1, 1]);
- ``OUT_PREFIX.json``, written last: the model's keyword arguments (``filter_list``, ``num_classes``, ``bn_epsilon``
  of the source: timm 1e-5, Keras 1e-3; ``pool_padding``: 'keras' for Keras weights) and the source file.
  :func:`load_pretrained` reads it back.

Reading and renaming live in ``weight_formats.py`` (no MXNet, so they also run in the reference environment).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from typing import Any, Literal, overload

from .console import OneLineParser, command_line, run_cli
from .errors import UserError
from .protocol import Preprocess
from .weight_formats import (
    check_against_model,
    detect_source,
    first_line,
    infer_model_kwargs,
    keras_to_params,
    read_keras,
    read_timm,
    timm_to_params,
)

__all__ = ["convert", "read_sidecar", "load_pretrained", "build_pretrained", "main", "FORMAT", "PREPROCESS"]

FORMAT = "xception_mx-pretrained"
FORMAT_VERSION = 1

#: Preprocessing of the published weights, written as OUT_PREFIX-preprocess.json. timm's ``legacy_xception.tf_in1k``
#: (the Keras weights, ported): bicubic resize of the shorter side to 333 (crop_pct 0.8975), centre crop 299,
#: mean = std = 0.5 on [0, 1], i.e. 127.5 on the 0-255 scale: inputs in [-1, 1]. Keras's
#: ``xception.preprocess_input`` is the same scaling (Keras fixes no resize or crop; timm's protocol is used).
PREPROCESS: dict[str, Preprocess] = {
    "timm": Preprocess(299, 0.8975, (127.5,) * 3, (127.5,) * 3, "bicubic"),
    "keras": Preprocess(299, 0.8975, (127.5,) * 3, (127.5,) * 3, "bicubic"),
}
#: timm's default configuration of ``xception41/65/71.tf_in1k`` (the DeepLab TF weights, ported): 299 px, crop_pct
#: 0.903 (shorter side 331), bicubic, mean = std = 0.5 on [0, 1] (IMAGENET_INCEPTION_MEAN/STD).
PREPROCESS_ALIGNED = Preprocess(299, 0.903, (127.5,) * 3, (127.5,) * 3, "bicubic")
BN_EPSILON = {"timm": 1e-5, "keras": 1e-3}
POOL_PADDING = {"timm": "symmetric", "keras": "keras"}

# ----------------------------------------------------------------------------------------------------------- writing

def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(src: str, out_prefix: str, source: str | None = None) -> dict[str, Any]:
    """Read ``src``, check it against the network it defines and write the three outputs; returns the sidecar dict."""
    source = source or detect_source(src)
    if source not in POOL_PADDING:
        raise UserError(f"--from must be timm or keras, got {source!r}")
    if source == "timm":
        mapped = timm_to_params(read_timm(src))
    else:
        mapped = keras_to_params(read_keras(src))
    import mxnet as mx

    from .weights import load_named

    kwargs, preprocess = _model_for(mapped.arrays, source, src)
    net = build_model(kwargs, dropout=0.0)
    params = net._collect_params_with_prefix()
    check_against_model(mapped, {n: p.shape for n, p in params.items()}, src)

    folder = os.path.dirname(os.path.abspath(out_prefix))
    base = os.path.basename(out_prefix)
    if not base:
        raise UserError(f"OUT_PREFIX {out_prefix!r} names a folder: give a prefix such as {out_prefix}xception")
    os.makedirs(folder, exist_ok=True)
    net.initialize(ctx=mx.cpu())
    load_named(params, {n: mx.nd.array(a, dtype="float32") for n, a in mapped.arrays.items()}, src)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model": kwargs,
        "source": {"framework": source, "file": os.path.basename(src), "sha256": _sha256(src),
                   "tensors": len(mapped.arrays)},
        "files": {"params": f"{base}.params", "symbol": f"{base}-symbol.json", "export_params": f"{base}-0000.params",
                  "preprocess": f"{base}-preprocess.json"},
        "score": f"{command_line('score.py', '--model-prefix', out_prefix, '--epoch', 0)} --rec VAL_SHARDS",
    }
    _write_outputs(net, folder, base, meta, preprocess)
    return {**meta, "preprocess": preprocess.to_dict()}


def _model_for(arrays: dict, source: str, src: str) -> tuple[dict, Preprocess]:
    """The sidecar's model settings and the weights' protocol: an aligned variant (told by its block count) or the
    paper's family (its widths)."""
    from .aligned import block_table
    from .registry import ALIGNED_CONFIGS

    blocks = {int(k.split(".")[2]) for k in arrays if k.startswith("features.blocks.")}
    if not blocks:
        kwargs = infer_model_kwargs(arrays)
        return {**kwargs, "bn_epsilon": BN_EPSILON[source], "pool_padding": POOL_PADDING[source]}, PREPROCESS[source]
    by_count = {len(block_table(**cfg)): name for name, cfg in ALIGNED_CONFIGS.items()}
    if source != "timm" or len(blocks) not in by_count or "fc.weight" not in arrays:
        raise UserError(f"{src}: an aligned Xception with {len(blocks)} blocks, which no registered variant has "
                        f"({', '.join(f'{n}: {c}' for c, n in sorted(by_count.items()))}); nothing written")
    return ({"name": by_count[len(blocks)], "num_classes": int(arrays["fc.weight"].shape[0]), "bn_epsilon": 1e-3},
            PREPROCESS_ALIGNED)


def build_model(model: dict, **overrides):
    """The network a sidecar's model settings describe (``name`` for a registered aligned variant)."""
    from .model import Xception
    from .registry import get_model

    kwargs = {**model, **overrides}
    try:
        return get_model(kwargs.pop("name"), **kwargs) if "name" in kwargs else Xception(**kwargs)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _write_outputs(net, folder: str, base: str, meta: dict, preprocess: Preprocess) -> None:
    """Native params, the export and its protocol, then the sidecar (its presence means the rest is complete)."""
    import mxnet as mx

    from .checkpoint import export_atomic
    from .fileio import atomic_path, atomic_write_text
    from .weights import named_params

    with atomic_path(os.path.join(folder, f"{base}.params")) as tmp:
        mx.nd.save(tmp, {name: p.data() for name, p in named_params(net).items()})
    net.hybridize()
    net(mx.nd.zeros((1, 3, 71, 71)))  # traces the graph for export (the symbol holds no input size)
    export_atomic(net, os.path.join(folder, base), 0)
    preprocess.write(os.path.join(folder, base))
    atomic_write_text(os.path.join(folder, f"{base}.json"), json.dumps(meta, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------- loading

def _resolve_prefix(path_or_prefix: str) -> str:
    for suffix in (".json", ".params"):
        if path_or_prefix.endswith(suffix) and not re.search(r"-\d{4,}\.params$", path_or_prefix):
            return path_or_prefix[: -len(suffix)]
    return path_or_prefix


@overload
def read_sidecar(prefix: str, required: Literal[True] = ...) -> dict: ...


@overload
def read_sidecar(prefix: str, required: bool) -> dict | None: ...


def read_sidecar(prefix: str, required: bool = True) -> dict | None:
    """The converter's ``OUT_PREFIX.json`` (model settings, source); None when absent (or another kind of JSON
    file) and not ``required``."""
    meta_path = f"{prefix}.json"
    if not os.path.isfile(meta_path):
        if not required:
            return None
        raise UserError(f"{meta_path} not found: pass the OUT_PREFIX given to `python -m xception_mx.convert` "
                        f"(which writes OUT_PREFIX.json and OUT_PREFIX.params)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta_path} is unreadable ({first_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        if not required:  # e.g. a training checkpoint's manifest beside its state file
            return None
        raise UserError(f"{meta_path} is not an xception_mx pretrained-weights sidecar")
    return meta


def load_pretrained(path_or_prefix: str) -> tuple[dict, dict]:
    """(params, meta) of a converted checkpoint: ``OUT_PREFIX``, ``OUT_PREFIX.params`` or ``OUT_PREFIX.json``.

    ``params`` maps structured names (``features.conv1.weight``, ``fc.bias``, BN ``running_mean``/``running_var``)
    to NDArrays on the CPU; ``meta`` is the sidecar: ``meta['model']`` holds the ``Xception`` keyword arguments
    (``filter_list``, ``num_classes``, ``bn_epsilon``, ``pool_padding``); ``meta['preprocess']`` is the protocol
    written beside the export.
    """
    from .weights import read_arrays

    prefix = _resolve_prefix(path_or_prefix)
    meta = read_sidecar(prefix)
    params = read_arrays(f"{prefix}.params", "converted weights")
    if "fc.weight" not in params:
        raise UserError(f"{prefix}.params holds no named Xception parameters")
    protocol = Preprocess.read(prefix)
    return params, {**meta, "preprocess": protocol.to_dict() if protocol else None}


def build_pretrained(path_or_prefix: str, **overrides):
    """An ``Xception`` built from the sidecar's keyword arguments (``overrides`` win) with the converted weights.

    With another ``num_classes`` the classifier is left uninitialised (call ``net.fc.initialize()``).
    """
    from .weights import load_named, named_params

    params, meta = load_pretrained(path_or_prefix)
    net = build_model(meta["model"], **overrides)
    keep_fc = net.num_classes == meta["model"]["num_classes"]
    load_named(named_params(net), params, f"{path_or_prefix} (converted weights)",
               skip_prefix=None if keep_fc else "fc.")
    return net


# --------------------------------------------------------------------------------------------------------------- CLI

#: The module form; ``xception-convert`` when run as the installed script (``console.program_name``).
PROG = "python -m xception_mx.convert"


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, allow_abbrev=False, description=(
        "Convert timm legacy_xception (.safetensors/.pth) or Keras Xception (.h5) weights into xception_mx files: "
        "OUT_PREFIX.params (native), OUT_PREFIX-symbol.json + OUT_PREFIX-0000.params (MXNet export, "
        "score.py --epoch 0) and OUT_PREFIX.json (model settings and preprocessing)."))
    parser.add_argument("src", metavar="SRC", help="weights file: .safetensors/.pth (timm) or .h5 (Keras)")
    parser.add_argument("out_prefix", metavar="OUT_PREFIX", help="output prefix, e.g. weights/xception_timm")
    parser.add_argument("--from", dest="source", choices=sorted(POOL_PADDING),
                        help="source framework (default: from SRC's extension)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m xception_mx.convert`` / ``xception-convert``: 0 on success, 2 on bad input."""
    def body() -> int:
        args = _parser().parse_args(argv)
        meta = convert(args.src, args.out_prefix, args.source)
        model = ", ".join(f"{k} {v}" for k, v in meta["model"].items())
        print(f"converted {meta['source']['tensors']} tensors from {args.src} ({meta['source']['framework']}): "
              f"{model}")
        for key in ("params", "symbol", "export_params", "preprocess"):
            print(f"  {os.path.join(os.path.dirname(args.out_prefix), meta['files'][key])}")
        print(f"  {args.out_prefix}.json")
        print(f"score: {meta['score']}")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
