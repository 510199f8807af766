"""Pretrained-weight files as numpy arrays under our parameter names: timm ``legacy_xception`` and Keras Xception.

Reading and renaming need no MXNet (they also run in the reference environment of the parity tests);
``convert.py`` checks the result against the network and writes our files.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from .errors import UserError

__all__ = ["detect_source", "read_timm", "read_keras", "timm_to_params", "keras_to_params", "infer_model_kwargs",
           "check_against_model", "Mapped", "first_line"]

_TIMM_EXT = (".safetensors", ".pth", ".pt", ".bin")
_KERAS_EXT = (".h5", ".hdf5")


# ----------------------------------------------------------------------------------------------------------- reading

def detect_source(path: str) -> str:
    """'timm' or 'keras' from the file name."""
    lower = path.lower()
    if lower.endswith(_TIMM_EXT):
        return "timm"
    if lower.endswith(_KERAS_EXT):
        return "keras"
    raise UserError(f"cannot tell the format of {path} from its name (.safetensors/.pth for timm, .h5 for "
                       f"Keras): pass --from timm or --from keras")


def _float32(name: str, value: np.ndarray) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.floating):
        raise UserError(f"tensor {name} has dtype {value.dtype}, expected floating point")
    return np.ascontiguousarray(value, dtype=np.float32)


def read_timm(path: str) -> dict[str, np.ndarray]:
    """A timm ``legacy_xception`` state dict as numpy arrays (integer buffers such as num_batches_tracked kept)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found")
    if path.lower().endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise UserError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        try:
            return dict(load_file(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {os.path.basename(path)} (a PyTorch pickle) needs torch, which is not "
                           f"installed: pip install torch, or convert from the .safetensors file") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a readable PyTorch state dict ({first_line(exc)})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    out = {}
    for name, value in state.items():
        if not hasattr(value, "detach"):
            raise UserError(f"{path}: entry {name} is a {type(value).__name__}, not a tensor")
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
        raise UserError(f"{path} not found")
    try:
        import h5py
    except ImportError:
        raise UserError("reading Keras .h5 files needs h5py: pip install h5py") from None
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path} is not a readable HDF5 file ({first_line(exc)})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        names = _hdf5_attr_list(root, "layer_names")
        if names is None:
            raise UserError(f"{path} has no 'layer_names': not a Keras legacy HDF5 weights file (Keras 3's "
                               f".weights.h5 layout is not supported; save with the legacy h5 format)")
        layers = []
        for layer in names:
            if layer not in root:
                raise UserError(f"{path}: layer {layer} is listed in layer_names but has no group")
            group = root[layer]
            weights = {}
            for weight_name in _hdf5_attr_list(group, "weight_names") or []:
                if weight_name not in group:  # listed but absent: reported as a missing tensor later
                    continue
                role = weight_name.rsplit("/", 1)[-1].split(":", 1)[0]
                if role in weights:
                    raise UserError(f"{path}: layer {layer} has two weights named {role}")
                weights[role] = np.asarray(group[weight_name])
            if weights:
                layers.append((layer, weights))
    return layers


# ----------------------------------------------------------------------------------------------------------- mapping

class Mapped:
    """Our parameter name -> array, with the source name of each for messages, and the source tensors left over."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.source: dict[str, str] = {}
        self.unused: list[str] = []

    def put(self, ours: str, source_name: str, value: np.ndarray) -> None:
        if ours in self.arrays:
            raise UserError(f"{source_name} and {self.source[ours]} both map to {ours}")
        self.arrays[ours] = _float32(source_name, value)
        self.source[ours] = source_name


def timm_to_params(state: dict[str, np.ndarray]) -> Mapped:
    """Rename a timm state dict to our names: ``features.`` prefix, BN weight/bias -> gamma/beta, ``fc`` as is.

    For ``legacy_xception`` and the aligned ``xception41/65/71`` (whose ``head.fc`` is our ``fc``). Accepts ``module.``
    prefixes and Cadene's layout (``last_linear``, 2-D pointwise weights); skips ``num_batches_tracked``.
    """
    clean = {}
    for name, value in state.items():
        key = name[len("module."):] if name.startswith("module.") else name
        if key.startswith("last_linear."):
            key = "fc." + key[len("last_linear."):]
        elif key.startswith("head.fc."):
            key = key[len("head."):]
        clean[key] = (name, value)
    mapped = Mapped()
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


def keras_to_params(layers: list[tuple[str, dict[str, np.ndarray]]]) -> Mapped:
    """Map Keras layers to our names and layouts.

    Named layers map by name (Keras ``block{k}`` is timm's ``block{k-1}``; ``block14_sepconv1/2`` are ``conv3/4``;
    ``predictions`` is ``fc``). The four unnamed shortcut convs and BNs (``conv2d_1``.. or ``conv2d``.., whatever
    Keras numbered them) go, in model order, to blocks 1, 2, 3 and 12.
    """
    mapped = Mapped()
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
            raise UserError(f"missing tensor {key} ({why}); nothing written")
    widths = [int(arrays[k].shape[0]) for k in keys]
    return {"filter_list": widths[:7], "num_classes": widths[7]}


def check_against_model(mapped: Mapped, expected: dict[str, tuple[int, ...]], what: str) -> None:
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
        raise UserError(f"{what}: " + "; ".join(problems) + "; nothing written")


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
