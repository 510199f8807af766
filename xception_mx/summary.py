"""Per-stage summary of a registered model: output shape, parameters, multiply-adds, training activation memory.

``python -m xception_mx.summary MODEL [--input-size S] [--num-classes K] [--batch-size B] [--json]``

How the figures are obtained (no weights are initialised and nothing is computed on tensors):

* The network is called on ``mx.sym.var('data')`` and the shapes of every node of the graph come from
  ``infer_shape`` on ``get_internals()``; so hybridized or not makes no difference (``Block.summary`` refuses
  hybridized networks and counts no FLOPs, apache/mxnet#14955).
* Stages: the model's child blocks are mapped onto stem, entry, middle, exit and head (:func:`stage_blocks`);
  a graph node belongs to the child whose name prefix it carries (the longest one), and a node written in a parent's
  ``hybrid_forward`` (``F.relu`` after a BN, the named features identity) to the stage of its first input. The
  global average pool belongs to the head here (the paper draws it in the exit flow).
* Parameters: the stage blocks' ``collect_params()``; ``params`` are the trainable ones (as
  :func:`~xception_mx.model.count_parameters`), ``params_total`` adds the BN running statistics.
* MACs (multiply-adds, per image): ``Convolution`` = output elements x (input channels / groups) x kernel area
  (so a depthwise 3x3 costs 9 per output element), ``FullyConnected`` = inputs x outputs. BatchNorm, ReLU,
  pooling, the residual sums and biases are not counted (BN folds into the conv at inference). BatchNorm is
  reported apart as ``bn_ops``: 2 per element (scale and shift), fvcore's count, which timm's tables include.
* Activation memory of a training step at batch B, float32: the distinct forward tensors that some backward pass
  reads, summed: the data input of every Convolution, FullyConnected, BatchNorm and max pool, the output of every
  ReLU and max pool, Dropout's mask (output-sized); residual sums, Flatten and identities keep nothing. An op not
  listed keeps its inputs and output. Not included: weights, gradients, optimizer state, BN's per-channel
  statistics, workspace, and whatever MXNet's memory planner shares or frees in place: an estimate, not a
  measurement. (A cross-check: for ``xception`` at 299 px, batch 1, MXNet's executor bound with gradients reports
  "Total 244 MB allocated" in ``debug_str()``; the estimate here is 229 MiB per image.)

The paper's ``xception`` at 299 px, 1000 classes: 22,855,952 trainable parameters, 8,357,403,496 MACs (8.36 G),
42,274,304 BN ops, 35,825,968 conv/linear output elements per image, 7.15 GiB of kept activations at batch 32.

Published figures. We match timm's results table (legacy_xception, 299 px: 8.4 GMACs): timm counts with fvcore,
one MAC per multiply-add of a conv or linear layer plus 2 per BN element, i.e. 8,357,403,496 + 42,274,304 = 8.40e9
here (8.36e9 without BN: 8.4 either way), and its activation count (35.83 M) is our conv/linear output count. The
same sum gives 9.28, 13.96 and 18.09 G for xception41/65/71 at 299 px, timm's figures for those as far as we know.
timm's model card metadata ("FLOPs: 10,600,506,792") is 1.268x our MACs and matches no convention we tried: not
2 x MACs (16.71e9 at 299 px), not MACs plus BN, ReLU, sums and pooling (8.41e9), not MACs at another input size
(the count jumps from 10.40e9 at 341-342 px to 11.11e9 at 343 px), nor 2 x MACs at one (10.57e9 at 241-242 px,
10.61e9 at 243-244 px). It was presumably made by another tool or setting; we do not match it.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass

import mxnet as mx
from mxnet.gluon import nn

from .aligned import EXIT_FLOW, XceptionAligned
from .console import OneLineParser, run_cli
from .errors import UserError
from .model import MIN_INPUT_SIZE, Xception
from .registry import ALIGNED_CONFIGS, get_model, list_models

__all__ = ["STAGES", "Stage", "Summary", "stage_blocks", "layer_macs", "summarize", "format_table", "main",
           "PUBLISHED_XCEPTION_299"]

STAGES = ("stem", "entry", "middle", "exit", "head")
BYTES_PER_VALUE = 4  # float32

#: Published figures for ``xception`` (timm's legacy_xception) at 299 px, 1000 classes; see the module docstring.
PUBLISHED_XCEPTION_299 = {"timm results table (GMACs)": 8.4e9, "timm model card (FLOPs)": 10_600_506_792}

#: op -> (keeps its data input, keeps its output) for backward; ops not listed keep both (conservative).
_KEEPS = {"Convolution": (True, False), "FullyConnected": (True, False), "BatchNorm": (True, False),
          "relu": (False, True), "Activation": (False, True), "Dropout": (False, True),
          "elemwise_add": (False, False), "_plus": (False, False), "broadcast_add": (False, False),
          "Flatten": (False, False), "_copy": (False, False), "identity": (False, False)}


@dataclass(frozen=True)
class Stage:
    """One stage: per-image output shape and MACs, parameters, BatchNorm ops per image (2 per element, not in
    ``macs``), conv/linear output elements per image (timm's "activations"), and the training activation memory
    (bytes) at the summary's batch size."""
    name: str
    output_shape: tuple[int, ...]
    params: int
    params_total: int
    macs: int
    bn_ops: int
    conv_outputs: int
    activation_bytes: int


@dataclass(frozen=True)
class Summary:
    """A model's stages (in :data:`STAGES` order) and their totals."""
    model: str
    input_size: int
    num_classes: int
    batch_size: int
    stages: list[Stage]

    def total(self, field: str) -> int:
        return sum(getattr(stage, field) for stage in self.stages)

    @property
    def params(self) -> int:
        return self.total("params")

    @property
    def macs(self) -> int:
        return self.total("macs")

    @property
    def activation_bytes(self) -> int:
        return self.total("activation_bytes")

    def to_dict(self) -> dict:
        totals = {f: self.total(f) for f in ("params", "params_total", "macs", "bn_ops", "conv_outputs",
                                           "activation_bytes")}
        return {**asdict(self), "totals": totals, "units": {
            "macs": "multiply-adds per image (conv + fully connected; BN, ReLU, pooling, sums not counted)",
            "bn_ops": "BatchNorm scale + shift, 2 per element per image (fvcore's count; not in macs)",
            "conv_outputs": "conv/linear output elements per image",
            "activation_bytes": f"float32 forward tensors kept for backward at batch {self.batch_size}"}}


def stage_blocks(net: nn.Block) -> dict[str, list[nn.Block]]:
    """The model's child blocks of each stage; together they hold every parameter of ``net``."""
    f = net.features
    head = [f.pool, f.flatten] + ([net.dropout] if net.dropout is not None else []) + [net.fc]
    if isinstance(net, Xception):
        blocks = [getattr(f, f"block{i}") for i in range(1, 13)]
        return {"stem": [f.conv1, f.bn1, f.conv2, f.bn2], "entry": blocks[:3], "middle": blocks[3:11],
                "exit": [blocks[11], f.conv3, f.bn3, f.conv4, f.bn4], "head": head}
    if isinstance(net, XceptionAligned):
        blocks = list(f.blocks)
        if net.arch not in ALIGNED_CONFIGS:
            raise TypeError(f"no stage map for the aligned table {net.arch!r}: register it in ALIGNED_CONFIGS")
        n_entry, n_exit = len(ALIGNED_CONFIGS[net.arch]["entry"]), len(EXIT_FLOW)
        return {"stem": [f.stem], "entry": blocks[:n_entry], "middle": blocks[n_entry:-n_exit],
                "exit": blocks[-n_exit:], "head": head}
    raise TypeError(f"no stage map for {type(net).__name__}")


def layer_macs(op: str, attrs: dict, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one graph node per image (shapes with the batch axis first); 0 for uncounted ops."""
    if op == "Convolution":
        kernel = math.prod(int(k) for k in attrs["kernel"].strip("()").split(",") if k.strip())
        return math.prod(out_shape[1:]) * (in_shape[1] // int(attrs.get("num_group", 1))) * kernel
    if op == "FullyConnected":
        return math.prod(in_shape[1:]) * out_shape[1]
    return 0


@dataclass
class _Node:
    op: str
    name: str
    attrs: dict
    inputs: list[int]  # graph node ids
    shape: tuple[int, ...]  # its (first) output at batch 1
    stage: str = ""


def _graph(net: nn.Block, input_size: int) -> list[_Node]:
    """Every node of ``net``'s graph with its output shape for one (3, S, S) image."""
    sym = net(mx.sym.var("data"))
    internals = sym.get_internals()
    _, shapes, _ = internals.infer_shape(data=(1, 3, input_size, input_size))
    by_name = dict(zip(internals.list_outputs(), shapes))
    nodes = []
    for raw in json.loads(sym.tojson())["nodes"]:
        key = raw["name"] if raw["op"] == "null" else f"{raw['name']}_output"
        nodes.append(_Node(raw["op"], raw["name"], raw.get("attrs", {}), [i[0] for i in raw["inputs"]],
                           tuple(by_name.get(key, ()))))
    return nodes


def _assign_stages(nodes: list[_Node], prefixes: list[tuple[str, str]]) -> None:
    """Stage of every op node: the longest matching block prefix, else the stage of its first op input."""
    prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
    for node in nodes:
        if node.op == "null":
            continue
        node.stage = next((stage for prefix, stage in prefixes if node.name.startswith(prefix)), "")
        if not node.stage:
            node.stage = next((nodes[i].stage for i in node.inputs if nodes[i].op != "null"), STAGES[0])


def _kept_tensors(nodes: list[_Node]) -> dict[int, str]:
    """Node id -> stage of every forward tensor some backward reads (the network input counts as stem)."""
    kept: dict[int, str] = {}
    for index, node in enumerate(nodes):
        if node.op == "null":
            continue
        keeps_input, keeps_output = _KEEPS.get(node.op, (True, True))
        if node.op == "Pooling" and node.attrs.get("pool_type", "max") == "max":
            keeps_input, keeps_output = True, True
        if keeps_input and node.inputs:
            kept[node.inputs[0]] = nodes[node.inputs[0]].stage or STAGES[0]
        if keeps_output:
            kept[index] = node.stage
    return kept


def _check(model_name: str, input_size: int, num_classes: int, batch_size: int) -> None:
    if model_name not in list_models():
        raise UserError(f"unknown model {model_name!r}; choose one of: {', '.join(list_models())}")
    if input_size < MIN_INPUT_SIZE:
        raise UserError(f"--input-size must be at least {MIN_INPUT_SIZE} (Xception's smallest input), "
                        f"got {input_size}")
    for flag, value in (("--num-classes", num_classes), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")


def summarize(model_name: str, input_size: int = 299, num_classes: int = 1000, batch_size: int = 32) -> Summary:
    """The per-stage :class:`Summary` of a registered model (raises :class:`UserError` on bad input)."""
    _check(model_name, input_size, num_classes, batch_size)
    net = get_model(model_name, num_classes=num_classes)
    blocks = stage_blocks(net)
    nodes = _graph(net, input_size)
    _assign_stages(nodes, [(b.prefix, stage) for stage, bl in blocks.items() for b in bl])
    kept = _kept_tensors(nodes)
    stages = []
    for stage in STAGES:
        own = [n for n in nodes if n.stage == stage]
        params = [p for b in blocks[stage] for p in b.collect_params().values()]
        macs = sum(layer_macs(n.op, n.attrs, nodes[n.inputs[0]].shape, n.shape) for n in own if n.inputs)
        bn_ops = 2 * sum(math.prod(n.shape[1:]) for n in own if n.op == "BatchNorm")
        convs = sum(math.prod(n.shape[1:]) for n in own if n.op in ("Convolution", "FullyConnected"))
        kept_values = sum(math.prod(nodes[i].shape[1:]) for i, s in kept.items() if s == stage)
        stages.append(Stage(stage, tuple(own[-1].shape[1:]) if own else (),
                            sum(math.prod(p.shape) for p in params if p.grad_req != "null"),
                            sum(math.prod(p.shape) for p in params), macs, bn_ops, convs,
                            kept_values * batch_size * BYTES_PER_VALUE))
    return Summary(model_name, input_size, num_classes, batch_size, stages)


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _published_lines(summary: Summary) -> list[str]:
    if (summary.model, summary.input_size, summary.num_classes) != ("xception", 299, 1000):
        return []
    ratio = PUBLISHED_XCEPTION_299["timm model card (FLOPs)"] / summary.macs
    with_bn = (summary.macs + summary.total("bn_ops")) / 1e9
    return [f"published (timm legacy_xception, 299 px): results table 8.4 GMACs: matched ({with_bn:.2f} G with BN, "
            f"{summary.macs / 1e9:.2f} G without);",
            f"  model card 'FLOPs' 10,600,506,792: not matched ({ratio:.3f}x ours; not 2 x MACs, not MACs + BN/ReLU,",
            "  not another input size: see the docstring of xception_mx/summary.py)"]


def format_table(summary: Summary) -> str:
    """The summary as a text table with totals and the counting conventions."""
    b = summary.batch_size
    head = ("stage", "output (per image)", "params", "MACs (per image)", "share", f"act. memory @ batch {b}")
    rows = [(s.name, "x".join(map(str, s.output_shape)), f"{s.params:,}", f"{s.macs:,}",
             f"{s.macs / max(summary.macs, 1):.1%}", _bytes(s.activation_bytes)) for s in summary.stages]
    total = ("total", "", f"{summary.params:,}", f"{summary.macs:,}", "100.0%", _bytes(summary.activation_bytes))
    widths = [max(len(r[i]) for r in (head, *rows, total)) for i in range(len(head))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "-" * len(fmt(head))
    return "\n".join([
        f"{summary.model}: {summary.input_size}x{summary.input_size} input, {summary.num_classes} classes",
        fmt(head), rule, *map(fmt, rows), rule, fmt(total),
        f"{summary.macs / 1e9:.2f} GMACs ({(summary.macs + summary.total('bn_ops')) / 1e9:.2f} G with BatchNorm at 2 "
        f"per element, as fvcore and timm count it); {summary.total('params_total'):,} parameters with BN running",
        f"  statistics; {summary.total('conv_outputs'):,} conv/linear output elements per image",
        "MACs: conv + fully connected multiply-adds (BatchNorm, ReLU, pooling, sums and biases not counted)",
        f"activation memory: float32 forward tensors that backward reads, at batch {b}: inputs of conv, FC, BN and",
        "  max pool, outputs of ReLU and max pool, the dropout mask (no weights, gradients or workspace)",
        *_published_lines(summary)])


#: The module form; ``xception-summary`` when run as the installed script (``console.program_name``).
PROG = "python -m xception_mx.summary"


def _parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, allow_abbrev=False,
                           description="Per-stage shapes, parameters, multiply-adds and training activation memory.")
    parser.add_argument("model", nargs="?", help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same, as the trainer spells it")
    parser.add_argument("--input-size", type=int, default=299, help="square input side in pixels (default 299)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the activation memory (default 32)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m xception_mx.summary MODEL ...`` / ``xception-summary``: 0 on success, 2 on bad input."""
    def body() -> int:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        if (args.model is None) == (args.model_flag is None):
            raise UserError(f"name one model, as MODEL or --model MODEL (one of: {', '.join(list_models())})")
        summary = summarize(args.model or args.model_flag, args.input_size, args.num_classes, args.batch_size)
        print(json.dumps(summary.to_dict(), indent=2) if args.json else format_table(summary))
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
