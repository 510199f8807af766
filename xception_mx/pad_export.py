"""Padded widths at load: an exported symbol/params pair (the paper's shapes, as every export is) rewritten in
memory so that every channel count is a multiple of ``channel_multiple``, the added channels zero.

The training side builds padded networks from the registry (:mod:`xception_mx.padding`); an export is only a graph,
so this walks it: each ``Convolution``'s ``num_filter`` (and a depthwise one's ``num_group``) is rounded up, and its
weight, BatchNorm's four arrays and the classifier's input columns get zero rows/columns. Element-wise ops, pooling
and additions pass channels through. A graph holding anything else (a fused or INT8 graph, a concat, a flatten of a
spatial map) is left as it is and the reason is returned. The files are not touched.
"""
from __future__ import annotations

import json

import mxnet as mx
import numpy as np

from .padding import round_up

__all__ = ["pad_export"]

#: Ops that keep their first input's channels (and whether its map is 1x1).
_PASS = {"Activation", "LeakyReLU", "relu", "Dropout", "amp_cast", "Cast", "_copy", "identity", "BlockGrad", "clip",
         "elemwise_add", "_Plus", "_plus", "broadcast_add", "Pooling", "Flatten", "softmax", "log_softmax",
         "SoftmaxActivation", "SoftmaxOutput", "_mul_scalar", "_div_scalar", "_plus_scalar", "_minus_scalar"}
_CASTS = {"amp_cast", "Cast"}
_ADDS = {"elemwise_add", "_Plus", "_plus", "broadcast_add"}
#: Ops whose output is not a feature map of channels: after them nothing is padded.
_HEADS = {"softmax", "log_softmax", "SoftmaxActivation", "SoftmaxOutput"}


class _Unsupported(Exception):
    pass


_INPUT = (0, 0, False)  # marks a graph input (compared by identity)


class _Widths:
    """Per node: (paper's channels, padded channels, map is 1x1) of output 0; the padded shape of each variable."""

    def __init__(self, nodes: list[dict], multiple: int, canonical: dict[str, tuple[int, ...]]):
        self.nodes, self.multiple, self.canonical = nodes, multiple, canonical
        self.channels: dict[int, tuple[int, int, bool] | None] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # variable name -> padded shape (only those that change)

    def walk(self) -> None:
        for i, node in enumerate(self.nodes):
            op, attrs = node["op"], node.get("attrs", {})
            if op == "null":  # a parameter, or an input: unpadded, its channels read off the first weight it meets
                self.channels[i] = None if node["name"] in self.canonical else _INPUT
                continue
            inputs = [self.channels.get(j) for j, *_ in node["inputs"]]
            if op == "Convolution":
                self.channels[i] = self._convolution(node, inputs[0], attrs)
            elif op == "BatchNorm":
                source = self._need(inputs[0], op, attrs.get("axis", "1") == "1")
                for j, *_ in node["inputs"][1:5]:
                    self.shapes[self.nodes[j]["name"]] = (source[1],)
                self.channels[i] = source
            elif op == "FullyConnected":
                source = self._need(inputs[0], op, inputs[0] is not None and inputs[0][2])
                self.shapes[self.nodes[node["inputs"][1][0]]["name"]] = (int(attrs["num_hidden"]), source[1])
                self.channels[i] = (int(attrs["num_hidden"]),) * 2 + (True,)
            elif op in _PASS:
                self.channels[i] = self._passing(op, attrs, inputs)
            else:
                raise _Unsupported(f"operator {op} ({node['name']})")

    def _need(self, channels, op: str, ok: bool) -> tuple[int, int, bool]:
        if channels is None or channels is _INPUT or not ok:
            raise _Unsupported(f"{op} on an input whose channels are not known")
        return channels

    def _convolution(self, node: dict, source, attrs: dict) -> tuple[int, int, bool]:
        filters, groups = int(attrs["num_filter"]), int(attrs.get("num_group", "1"))
        weight = self.nodes[node["inputs"][1][0]]["name"]
        if source is _INPUT:  # the network's input: its channels stay as they are
            source = (self.canonical[weight][1] * groups,) * 2 + (False,)
        self._need(source, "Convolution", True)
        c, c_padded, _ = source
        if groups == 1:
            out = round_up(filters, self.multiple)
            in_per_group = c_padded
        elif groups == c and filters % groups == 0:  # depthwise (a channel multiplier of filters / c)
            out, groups = filters // c * c_padded, c_padded
            in_per_group = 1
        else:
            raise _Unsupported(f"grouped convolution {node['name']} ({groups} groups on {c} channels)")
        attrs.update(num_filter=str(out), num_group=str(groups))
        kernel = tuple(int(k) for k in attrs["kernel"].strip("()[] ").split(",") if k.strip())
        self.shapes[weight] = (out, in_per_group, *kernel)
        if len(node["inputs"]) > 2:
            self.shapes[self.nodes[node["inputs"][2][0]]["name"]] = (out,)
        return filters, out, False

    def _passing(self, op: str, attrs: dict, inputs: list):
        if op in _HEADS:
            return None
        if op in _ADDS and len({c[:2] if c else None for c in inputs}) != 1:
            raise _Unsupported(f"{op} of inputs with different widths")
        if inputs[0] is _INPUT and op in _CASTS:  # the input cast to bfloat16: still the input
            return _INPUT
        if inputs[0] is None or inputs[0] is _INPUT:
            return None
        c, c_padded, one = inputs[0]
        if op == "Pooling":
            one = one or attrs.get("global_pool", "False") in ("True", "true", "1")
        if op == "Flatten" and not one:
            raise _Unsupported("Flatten of a spatial map (its features interleave channels)")
        return c, c_padded, one


def _zero_padded(array: mx.nd.NDArray, shape: tuple[int, ...]) -> mx.nd.NDArray:
    """``array`` in the leading corner of a zero array of ``shape``."""
    if tuple(array.shape) == shape:
        return array
    source = array if array.dtype in (np.float32, np.float64, np.float16) else array.astype("float32")  # bfloat16
    out = np.zeros(shape, dtype=source.dtype)
    out[tuple(slice(0, n) for n in array.shape)] = source.asnumpy()
    return mx.nd.array(out, dtype=source.dtype).astype(array.dtype, copy=False)


def pad_export(symbol: mx.sym.Symbol, params: dict[str, mx.nd.NDArray], multiple: int
               ) -> tuple[mx.sym.Symbol, dict[str, mx.nd.NDArray], str | None]:
    """``symbol`` and ``params`` (``arg:``/``aux:`` keys, as a ``.params`` file holds them) at widths rounded up to
    ``multiple``; or the inputs unchanged and the reason, for a graph this cannot pad."""
    if multiple == 1:
        return symbol, params, None
    graph = json.loads(symbol.tojson(remove_amp_cast=False))  # a bfloat16 export keeps its casts
    canonical = {k.split(":", 1)[-1]: tuple(v.shape) for k, v in params.items()}
    widths = _Widths(graph["nodes"], multiple, canonical)
    try:
        widths.walk()
    except _Unsupported as exc:
        return symbol, params, str(exc)
    for node in graph["nodes"]:  # a variable may carry its shape (``__shape__``), which binding checks
        if node["op"] == "null" and node["name"] in widths.shapes and "__shape__" in node.get("attrs", {}):
            node["attrs"]["__shape__"] = str(widths.shapes[node["name"]])
    padded = {}
    for key, array in params.items():
        name = key.split(":", 1)[1] if key.startswith(("arg:", "aux:")) else key
        padded[key] = _zero_padded(array, widths.shapes[name]) if name in widths.shapes else array
    return mx.sym.load_json(json.dumps(graph)), padded, None
