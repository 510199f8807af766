"""Import pretrained Xception weights from timm (``legacy_xception``) or Keras (``applications.Xception``).

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
- ``OUT_PREFIX.json``, written last: the model's keyword arguments (``filter_list``, ``num_classes``, ``bn_epsilon``
  of the source: timm 1e-5, Keras 1e-3; ``pool_padding``: 'keras' for Keras weights) and the preprocessing that goes
  with the weights. :func:`load_pretrained` reads it back.

Reading needs no MXNet (it is imported when writing), so the readers also run in the reference environment.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from typing import Any

import numpy as np

from .config import ConfigError

__all__ = ["ConvertError", "read_timm", "read_keras", "timm_to_params", "keras_to_params", "infer_model_kwargs",
           "convert", "load_pretrained", "build_pretrained", "main", "FORMAT", "PREPROCESS"]

FORMAT = "xception_mx-pretrained"
FORMAT_VERSION = 1

#: Preprocessing of the published weights. timm's ``legacy_xception.tf_in1k`` (the Keras weights, ported):
#: bicubic resize of the shorter side to 333 (crop_pct 0.8975), centre crop 299, mean = std = 0.5 on [0, 1], i.e.
#: 127.5 on the 0-255 scale: inputs in [-1, 1]. Keras's ``xception.preprocess_input`` is the same scaling.
PREPROCESS: dict[str, dict[str, Any]] = {
    "timm": {"input_size": 299, "resize_shorter": 333, "crop_pct": 0.8975, "interpolation": "bicubic",
             "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3, "value_range": [-1.0, 1.0]},
    "keras": {"input_size": 299, "resize_shorter": 333, "crop_pct": 0.8975, "interpolation": "bicubic",
              "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3, "value_range": [-1.0, 1.0],
              "note": "keras.applications.xception.preprocess_input scaling (x / 127.5 - 1); Keras fixes no "
                      "resize/crop, timm's protocol for the same weights is given"},
}
BN_EPSILON = {"timm": 1e-5, "keras": 1e-3}
POOL_PADDING = {"timm": "symmetric", "keras": "keras"}

_TIMM_EXT = (".safetensors", ".pth", ".pt", ".bin")
_KERAS_EXT = (".h5", ".hdf5")


class ConvertError(ConfigError):
    """Unusable weights or arguments; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------------------- reading

def detect_source(path: str) -> str:
    """'timm' or 'keras' from the file name."""
    lower = path.lower()
    if lower.endswith(_TIMM_EXT):
        return "timm"
    if lower.endswith(_KERAS_EXT):
        return "keras"
    raise ConvertError(f"cannot tell the format of {path} from its name (.safetensors/.pth for timm, .h5 for "
                       f"Keras): pass --from timm or --from keras")


def _float32(name: str, value: np.ndarray) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.floating):
        raise ConvertError(f"tensor {name} has dtype {value.dtype}, expected floating point")
    return np.ascontiguousarray(value, dtype=np.float32)


def read_timm(path: str) -> dict[str, np.ndarray]:
    """A timm ``legacy_xception`` state dict as numpy arrays (integer buffers such as num_batches_tracked kept)."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path} not found")
    if path.lower().endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ConvertError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        try:
            return dict(load_file(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ConvertError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None
    try:
        import torch
    except ImportError:
        raise ConvertError(f"reading {os.path.basename(path)} (a PyTorch pickle) needs torch, which is not "
                           f"installed: pip install torch, or convert from the .safetensors file") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConvertError(f"{path} is not a readable PyTorch state dict ({_first_line(exc)})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ConvertError(f"{path} holds a {type(state).__name__}, not a state dict")
    out = {}
    for name, value in state.items():
        if not hasattr(value, "detach"):
            raise ConvertError(f"{path}: entry {name} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        out[str(name)] = value.numpy()
    return out


def _hdf5_attr_list(group, name: str) -> list[str] | None:
    """A string-list attribute, also when Keras split it into ``name0``, ``name1``, ... (HDF5's 64 KB limit)."""
    if name in group.attrs:
        values = list(group.attrs[name])
    elif f"{name}0" in group.attrs:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values.extend(group.attrs[f"{name}{i}"])
            i += 1
    else:
        return None
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def read_keras(path: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The layers of a Keras legacy HDF5 weights file, in model order: [(layer name, {kernel|gamma|...: array})].

    Layers without weights are left out. Weight names such as ``block1_conv1/kernel:0`` become ``kernel``.
    """
    if not os.path.isfile(path):
        raise ConvertError(f"{path} not found")
    try:
        import h5py
    except ImportError:
        raise ConvertError("reading Keras .h5 files needs h5py: pip install h5py") from None
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ConvertError(f"{path} is not a readable HDF5 file ({_first_line(exc)})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        names = _hdf5_attr_list(root, "layer_names")
        if names is None:
            raise ConvertError(f"{path} has no 'layer_names': not a Keras legacy HDF5 weights file (Keras 3's "
                               f".weights.h5 layout is not supported; save with the legacy h5 format)")
        layers = []
        for layer in names:
            if layer not in root:
                raise ConvertError(f"{path}: layer {layer} is listed in layer_names but has no group")
            group = root[layer]
            weights = {}
            for weight_name in _hdf5_attr_list(group, "weight_names") or []:
                if weight_name not in group:  # listed but absent: reported as a missing tensor later
                    continue
                role = weight_name.rsplit("/", 1)[-1].split(":", 1)[0]
                if role in weights:
                    raise ConvertError(f"{path}: layer {layer} has two weights named {role}")
                weights[role] = np.asarray(group[weight_name])
            if weights:
                layers.append((layer, weights))
    return layers


# ----------------------------------------------------------------------------------------------------------- mapping

class _Mapped:
    """Our parameter name -> array, with the source name of each for messages, and the source tensors left over."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.source: dict[str, str] = {}
        self.unused: list[str] = []

    def put(self, ours: str, source_name: str, value: np.ndarray) -> None:
        if ours in self.arrays:
            raise ConvertError(f"{source_name} and {self.source[ours]} both map to {ours}")
        self.arrays[ours] = _float32(source_name, value)
        self.source[ours] = source_name


def timm_to_params(state: dict[str, np.ndarray]) -> _Mapped:
    """Rename a timm state dict to our names: ``features.`` prefix, BN weight/bias -> gamma/beta, ``fc`` as is.

    Accepts ``module.`` prefixes and Cadene's layout (``last_linear``, 2-D pointwise weights); skips
    ``num_batches_tracked``.
    """
    clean = {}
    for name, value in state.items():
        key = name[len("module."):] if name.startswith("module.") else name
        if key.startswith("last_linear."):
            key = "fc." + key[len("last_linear."):]
        clean[key] = (name, value)
    mapped = _Mapped()
    for key, (name, value) in clean.items():
        if key.endswith("num_batches_tracked"):
            continue
        module, _, leaf = key.rpartition(".")
        if key.startswith("fc."):
            ours = key
        elif f"{module}.running_mean" in clean and leaf in ("weight", "bias"):
            ours = f"features.{module}.{'gamma' if leaf == 'weight' else 'beta'}"
        else:
            ours = f"features.{key}"
        if ".pointwise.weight" in key and value.ndim == 2:  # Cadene's files store 1x1 convs as matrices
            value = value[:, :, None, None]
        mapped.put(ours, name, value)
    return mapped


def _rep_index(block: int, sep: int, bn: bool) -> int:
    """Index in ``features.block<block>.rep`` of separable conv ``sep`` (0-based) or of its BN.

    rep is [ReLU, SepConv, BN] x reps (+ pool); block 1 has no leading ReLU (timm's layout).
    """
    return (0 if block == 1 else 1) + 3 * sep + (1 if bn else 0)


_KERAS_SEPCONV = re.compile(r"^block(\d+)_sepconv(\d+)(_bn)?$")
_KERAS_STEM = {"block1_conv1": "features.conv1", "block1_conv1_bn": "features.bn1",
               "block1_conv2": "features.conv2", "block1_conv2_bn": "features.bn2", "predictions": "fc"}
_RESIDUAL_BLOCKS = (1, 2, 3, 12)  # the blocks with a 1x1 conv shortcut, in model order


def _keras_layer_target(layer: str, weights: dict[str, np.ndarray], residual: dict[str, list]) -> str | None:
    """Our module path for a Keras layer (None: no place for it). Unnamed layers go to the shortcut lists."""
    if layer in _KERAS_STEM:
        return _KERAS_STEM[layer]
    match = _KERAS_SEPCONV.match(layer)
    if match:
        block, sep, bn = int(match.group(1)), int(match.group(2)) - 1, bool(match.group(3))
        if block == 14 and sep in (0, 1):  # the exit flow's two separable convs after block 13
            return f"features.{('conv3', 'conv4')[sep]}" if not bn else f"features.{('bn3', 'bn4')[sep]}"
        if 2 <= block <= 13 and sep >= 0:  # Keras block k is our (timm's) block k - 1
            return f"features.block{block - 1}.rep.{_rep_index(block - 1, sep, bn)}"
        return None
    if "moving_mean" in weights:
        residual["bn"].append(layer)
    elif "kernel" in weights and weights["kernel"].ndim == 4:
        residual["conv"].append(layer)
    else:
        return None
    return ""


def keras_to_params(layers: list[tuple[str, dict[str, np.ndarray]]]) -> _Mapped:
    """Map Keras layers to our names and layouts.

    Named layers map by name (Keras ``block{k}`` is timm's ``block{k-1}``; ``block14_sepconv1/2`` are ``conv3/4``;
    ``predictions`` is ``fc``). The four unnamed shortcut convs and BNs (``conv2d_1``.. or ``conv2d``.., whatever
    Keras numbered them) go, in model order, to blocks 1, 2, 3 and 12.
    """
    mapped = _Mapped()
    residual: dict[str, list] = {"conv": [], "bn": []}
    targets = {}
    for layer, weights in layers:
        target = _keras_layer_target(layer, weights, residual)
        if target is None:
            mapped.unused.extend(f"{layer}/{role}" for role in weights)
        elif target:
            targets[layer] = target
    for kind, leaf in (("conv", "skip"), ("bn", "skipbn")):
        found = residual[kind]
        for block, layer in zip(_RESIDUAL_BLOCKS, found):
            targets[layer] = f"features.block{block}.{leaf}"
        for layer in found[len(_RESIDUAL_BLOCKS):]:
            mapped.unused.extend(f"{layer}/{role}" for role in dict(layers)[layer])
    for layer, weights in layers:
        if layer not in targets:
            continue
        target = targets[layer]
        for role, value in weights.items():
            source = f"{layer}/{role}"
            if role == "depthwise_kernel" and value.ndim == 4:  # (kh, kw, in, mult) -> (in * mult, 1, kh, kw)
                kh, kw, cin, mult = value.shape
                mapped.put(f"{target}.conv1.weight", source,
                           value.transpose(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw))
            elif role == "pointwise_kernel" and value.ndim == 4:  # (1, 1, in, out) -> (out, in, 1, 1)
                mapped.put(f"{target}.pointwise.weight", source, value.transpose(3, 2, 0, 1))
            elif role == "kernel" and value.ndim == 4:  # HWIO -> OIHW
                mapped.put(f"{target}.weight", source, value.transpose(3, 2, 0, 1))
            elif role == "kernel" and value.ndim == 2:  # Dense (in, out) -> (out, in)
                mapped.put(f"{target}.weight", source, value.T)
            elif role in ("gamma", "beta", "bias"):
                mapped.put(f"{target}.{role}", source, value)
            elif role in ("moving_mean", "moving_variance"):
                mapped.put(f"{target}.running_{'mean' if role == 'moving_mean' else 'var'}", source, value)
            else:
                mapped.unused.append(source)
    return mapped


def infer_model_kwargs(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``filter_list`` and ``num_classes`` from the output widths of the layers that define them."""
    keys = ["features.conv2.weight", "features.block1.skip.weight", "features.block2.skip.weight",
            "features.block3.skip.weight", "features.block12.skip.weight", "features.conv3.pointwise.weight",
            "features.conv4.pointwise.weight", "fc.weight"]
    for key in keys:
        if key not in arrays:
            why = ("the classifier; 'notop' files have none" if key == "fc.weight"
                   else "it fixes the network's widths; is this an Xception?")
            raise ConvertError(f"missing tensor {key} ({why}); nothing written")
    widths = [int(arrays[k].shape[0]) for k in keys]
    return {"filter_list": widths[:7], "num_classes": widths[7]}


def _check_against_model(mapped: _Mapped, expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Every parameter filled with the right shape and every source tensor used, or one line naming the first gap."""
    missing = [n for n in expected if n not in mapped.arrays]
    extra = sorted([mapped.source[n] for n in mapped.arrays if n not in expected] + mapped.unused)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) left over: {_names(extra)}")
    for name, shape in expected.items():
        if name in mapped.arrays and tuple(mapped.arrays[name].shape) != tuple(shape):
            got = mapped.arrays[name].shape
            problems.append(f"tensor {mapped.source[name]} has shape {tuple(got)}, {name} needs {tuple(shape)}")
            break
    if problems:
        raise ConvertError(f"{what}: " + "; ".join(problems) + "; nothing written")


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


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
        raise ConvertError(f"--from must be timm or keras, got {source!r}")
    if source == "timm":
        mapped = timm_to_params(read_timm(src))
    else:
        mapped = keras_to_params(read_keras(src))
    kwargs = infer_model_kwargs(mapped.arrays)
    kwargs.update(bn_epsilon=BN_EPSILON[source], pool_padding=POOL_PADDING[source])

    import mxnet as mx

    from .model import Xception

    try:
        net = Xception(dropout=0.0, **kwargs)
    except ValueError as exc:
        raise ConvertError(f"{src}: {exc}") from None
    params = net._collect_params_with_prefix()
    _check_against_model(mapped, {n: p.shape for n, p in params.items()}, src)

    folder = os.path.dirname(os.path.abspath(out_prefix))
    base = os.path.basename(out_prefix)
    if not base:
        raise ConvertError(f"OUT_PREFIX {out_prefix!r} names a folder: give a prefix such as {out_prefix}xception")
    os.makedirs(folder, exist_ok=True)
    net.initialize(ctx=mx.cpu())
    for name, param in params.items():
        param.set_data(mx.nd.array(mapped.arrays[name], dtype="float32"))
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model": kwargs,
        "preprocess": PREPROCESS[source],
        "source": {"framework": source, "file": os.path.basename(src), "sha256": _sha256(src),
                   "tensors": len(mapped.arrays)},
        "files": {"params": f"{base}.params", "symbol": f"{base}-symbol.json", "export_params": f"{base}-0000.params"},
        "score": f"score.py --model-prefix {out_prefix} --epoch 0 --data-shape 3,299,299 --crop-pct 0.8975 "
                 f"--rec VAL_SHARDS",
    }
    _write_outputs(net, folder, base, meta)
    return meta


def _write_outputs(net, folder: str, base: str, meta: dict) -> None:
    """Native params, the export, then the sidecar (its presence means the other files are complete)."""
    import tempfile

    import mxnet as mx

    from .checkpoint import atomic_replace, atomic_write_text, export_atomic

    params_path = os.path.join(folder, f"{base}.params")
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.params.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        mx.nd.save(tmp, {name: p.data() for name, p in net._collect_params_with_prefix().items()})
        atomic_replace(tmp, params_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    net.hybridize()
    net(mx.nd.zeros((1, 3, 71, 71)))  # traces the graph for export (the symbol holds no input size)
    export_atomic(net, folder, base, 0)
    atomic_write_text(os.path.join(folder, f"{base}.json"), json.dumps(meta, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------- loading

def _resolve_prefix(path_or_prefix: str) -> str:
    for suffix in (".json", ".params"):
        if path_or_prefix.endswith(suffix) and not re.search(r"-\d{4,}\.params$", path_or_prefix):
            return path_or_prefix[: -len(suffix)]
    return path_or_prefix


def load_pretrained(path_or_prefix: str) -> tuple[dict, dict]:
    """(params, meta) of a converted checkpoint: ``OUT_PREFIX``, ``OUT_PREFIX.params`` or ``OUT_PREFIX.json``.

    ``params`` maps structured names (``features.conv1.weight``, ``fc.bias``, BN ``running_mean``/``running_var``)
    to NDArrays on the CPU; ``meta`` is the sidecar: ``meta['model']`` holds the ``Xception`` keyword arguments
    (``filter_list``, ``num_classes``, ``bn_epsilon``, ``pool_padding``), ``meta['preprocess']`` the protocol.
    """
    import mxnet as mx

    prefix = _resolve_prefix(path_or_prefix)
    meta_path, params_path = f"{prefix}.json", f"{prefix}.params"
    if not os.path.isfile(meta_path):
        raise ConvertError(f"{meta_path} not found: pass the OUT_PREFIX given to `python -m xception_mx.convert` "
                           f"(which writes OUT_PREFIX.json and OUT_PREFIX.params)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{meta_path} is unreadable ({_first_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConvertError(f"{meta_path} is not an xception_mx pretrained-weights sidecar")
    if not os.path.isfile(params_path):
        raise ConvertError(f"{params_path} not found beside {meta_path}")
    try:
        params = mx.nd.load(params_path)
    except mx.base.MXNetError:
        raise ConvertError(f"{params_path} is not a readable MXNet parameter file") from None
    if not isinstance(params, dict) or "fc.weight" not in params:
        raise ConvertError(f"{params_path} holds no named Xception parameters")
    return params, meta


def build_pretrained(path_or_prefix: str, **overrides):
    """An ``Xception`` built from the sidecar's keyword arguments (``overrides`` win) with the converted weights.

    With another ``num_classes`` the classifier is left uninitialised (call ``net.fc.initialize()``).
    """
    import mxnet as mx

    from .model import Xception

    params, meta = load_pretrained(path_or_prefix)
    kwargs = {**meta["model"], **overrides}
    net = Xception(**kwargs)
    own = net._collect_params_with_prefix()
    keep_fc = kwargs["num_classes"] == meta["model"]["num_classes"]
    for name, param in own.items():
        if name.startswith("fc.") and not keep_fc:
            continue
        param._load_init(params[name], ctx=mx.cpu())
    return net


# --------------------------------------------------------------------------------------------------------------- CLI

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConvertError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m xception_mx.convert", allow_abbrev=False, description=(
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
    from .cli import run_cli

    def body() -> int:
        args = _parser().parse_args(argv)
        meta = convert(args.src, args.out_prefix, args.source)
        m = meta["model"]
        print(f"converted {meta['source']['tensors']} tensors from {args.src} ({meta['source']['framework']}): "
              f"filter_list {m['filter_list']}, {m['num_classes']} classes, bn_epsilon {m['bn_epsilon']}, "
              f"pool_padding {m['pool_padding']}")
        for key in ("params", "symbol", "export_params"):
            print(f"  {os.path.join(os.path.dirname(args.out_prefix), meta['files'][key])}")
        print(f"  {args.out_prefix}.json")
        print(f"score: {meta['score']}")
        return 0

    return run_cli("xception_mx.convert", body)


if __name__ == "__main__":
    sys.exit(main())
