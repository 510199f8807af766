"""``score.py`` / ``xception-score``: the scoring command line, beside the scoring functions (``score.py``).

Sub-commands: ``score`` (the default: ``score.py --model-prefix P --epoch N --rec VAL``), ``predict`` (the top-k
classes of single images) and ``benchmark`` (img/s on synthetic batches; ``score.py --benchmark ...``, the older
spelling, is the same). Here: the parsers, the protocol merged from the export's own and the flags, and what is
printed. Imports no MXNet until a command runs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any

from .console import OneLineParser, run_command, setup_logging
from .errors import UserError

__all__ = ["build_parser", "main", "add_export_flags", "resolve_export_args"]

log = logging.getLogger("xception_mx.score")

#: The repository script; ``xception-score`` when run as the installed script (``console.program_name``).
PROG = "score.py"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, allow_abbrev=False, description=(
        "Score an exported checkpoint on RecordIO shards (top-1, top-5, cross-entropy, img/s), predict images or "
        "benchmark it. Without a command: score (`%(prog)s --model-prefix P --epoch N|best|last --rec VAL`). A "
        "command's flags: `%(prog)s COMMAND -h`."))
    commands = parser.add_commands()
    p = commands.add_parser("score", allow_abbrev=False, help="top-1, top-5, cross-entropy and img/s on shards "
                                                             "(the default command)")
    _export_flags(p)
    _protocol_flags(p)
    p.add_argument("--rec", help="validation shards: a prefix, a glob or a ';'-separated list")
    p.add_argument("--batch-size", default="32", help="batch size")
    p.add_argument("--cpus", type=int, default=1, help="CPU contexts when no GPU is given")
    p.add_argument("--preprocess-threads", type=int, default=4)
    p.add_argument("--json", help="write the figures and the protocol here")
    p.add_argument("--per-class", action="store_true", help="per-class accuracy and a confusion matrix")
    p.add_argument("--verify-checksums", action="store_true",
                   help="check every record against the shards' .crc checksums first")
    p.add_argument("--confusion-csv", help="where --per-class writes the confusion matrix "
                                           "(default: PREFIX-NNNN-confusion.csv)")
    p.set_defaults(func=_run_score)
    p = commands.add_parser("predict", allow_abbrev=False, help="top-k classes of images under the validation "
                                                               "protocol")
    _export_flags(p)
    _protocol_flags(p)
    p.add_argument("images", nargs="+", help="image files, or folders of them (any depth)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", help="also write the predictions here")
    p.set_defaults(func=_run_predict)
    p = commands.add_parser("benchmark", allow_abbrev=False, help="img/s and ms/batch on synthetic batches")
    _export_flags(p)
    p.add_argument("--batch-size", default="32", help="batch sizes, e.g. 1,8,32")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.set_defaults(func=_run_benchmark)
    return parser


def add_export_flags(p) -> None:
    """Which export a command loads: ``--model-prefix`` with ``--epoch``, or ``--checkpoint`` (see
    :func:`resolve_export_args`)."""
    p.add_argument("--model-prefix", help="PREFIX of PREFIX-symbol.json / PREFIX-NNNN.params (with --epoch)")
    p.add_argument("--epoch", help="best (the run folder's best.json), last (the highest PREFIX-NNNN.params) or "
                                   "NNNN")
    p.add_argument("--checkpoint", help="an export's PREFIX-NNNN.params, instead of --model-prefix and --epoch")


def resolve_export_args(args) -> None:
    """``args.model_prefix`` and ``args.epoch`` (an int) set to the export the flags name
    (``runfolder.resolve_export``); logged when it was not given as a number."""
    from .runfolder import resolve_export

    given = args.epoch
    args.model_prefix, args.epoch = resolve_export(args.model_prefix, given, args.checkpoint)
    if not (given or "").isdigit():
        log.info("export %s-%04d.params (%s)", args.model_prefix, args.epoch,
                 f"--epoch {given}" if given else "--checkpoint")


def _export_flags(p) -> None:
    add_export_flags(p)
    p.add_argument("--gpus", default="", help="GPU ids, e.g. 0,1; empty = CPU")
    p.add_argument("--data-shape", help="C,H,W (default: the export's protocol, PREFIX-preprocess.json, "
                                        "else 3,299,299)")
    p.add_argument("--no-fuse", action="store_true", help="run the graph as exported (on CPU the default lets "
                                                          "oneDNN fuse it: same logits within 1e-5, faster)")
    p.add_argument("--amp", choices=["off", "bfloat16"], default="off",
                   help="bfloat16: convert the export at load (CPUs with avx512_bf16; top-1 within 0.5 points of "
                        "fp32 on the demo, see docs)")
    p.add_argument("--channel-multiple", default="auto",
                   help="compute at widths rounded up to this multiple, added channels zero, files untouched "
                        "(auto: 16 on CPU, where every path is as fast or faster; 1 on GPUs)")


def _speedups(args):
    """The --no-fuse, --amp and --channel-multiple flags as one decision."""
    from .inference import Speedups

    multiple = args.channel_multiple
    if multiple != "auto":
        if not multiple.isdigit() or int(multiple) < 1:
            raise UserError(f"--channel-multiple must be auto or a positive integer, got {multiple!r}")
        multiple = int(multiple)
    return Speedups(fuse=not args.no_fuse, amp=args.amp, channel_multiple=multiple)


def _protocol_flags(p) -> None:
    p.add_argument("--crop-pct", type=float, help="resize shorter side to H / crop_pct, then centre crop "
                                                  "(default: the export's protocol, else 0.8975)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic"],
                   help="resize interpolation (default: the export's protocol, else bilinear)")
    p.add_argument("--mean", help="R,G,B mean on the 0-255 scale (default: the export's protocol, else 127.5)")
    p.add_argument("--std", help="R,G,B std on the 0-255 scale (default: the export's protocol, else 127.5)")
    p.add_argument("--classes", help="classes.txt from `im2rec-tools make-list` for class names (default: the "
                                     "classes.txt beside the export, which the trainer copies into its run folder)")


def _data_shape(text: str | None, saved) -> tuple[int, int, int]:
    """``--data-shape`` C,H,W, else the export's input size."""
    if not text:
        return 3, saved.input_size, saved.input_size
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--data-shape must be C,H,W integers, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--data-shape must be C,H,W positive integers, got {text!r}")
    return shape


def _floats(text: str, name: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if len(values) not in (1, 3):
        raise UserError(f"--{name} needs 1 or 3 values, got {text!r}")
    first, second, third = values * 3 if len(values) == 1 else values
    return first, second, third


def _protocol(args) -> tuple:
    """(data shape, Preprocess, GPU ids): the export's own protocol, each flag given overriding its part."""
    from .config import parse_device_list
    from .score import export_protocol

    saved = export_protocol(args.model_prefix)
    shape = _data_shape(args.data_shape, saved)
    changes: dict[str, Any] = {"input_size": max(shape[1:])}  # Preprocess fields of several types
    if args.crop_pct is not None:
        if not 0 < args.crop_pct <= 1:
            raise UserError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
        changes["crop_pct"] = args.crop_pct
    if args.mean:
        changes["mean"] = _floats(args.mean, "mean")
    if args.std:
        changes["std"] = _floats(args.std, "std")
        if min(changes["std"]) <= 0:
            raise UserError("--std values must be > 0")
    if args.interpolation:
        changes["interpolation"] = args.interpolation
    return shape, dataclasses.replace(saved, **changes), parse_device_list(args.gpus)


def _batch_sizes(text: str, several: bool) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        what = "an integer or a list, e.g. 1,8,32" if several else "an integer"
        raise UserError(f"--batch-size must be {what}, got {text!r}") from None
    if min(sizes) < 1 or (len(sizes) > 1 and not several):
        what = "positive integers" if several else "one positive integer when scoring"
        raise UserError(f"--batch-size must be {what}, got {text!r}")
    return sizes


def _write_json(path: str | None, obj) -> None:
    if path:
        import json

        from .fileio import atomic_write_text, write_errors

        with write_errors(os.path.dirname(os.path.abspath(path)), f"the report {path}"):
            atomic_write_text(path, json.dumps(obj, indent=1))


def _run_score(args) -> int:
    from .evaluate import make_contexts
    from .score import score, write_confusion_csv

    resolve_export_args(args)
    shape, pre, gpus = _protocol(args)
    batch_size = _batch_sizes(args.batch_size, several=False)[0]
    ctx = make_contexts(gpus, args.cpus)
    if not args.rec:
        raise UserError("--rec is required (the validation shards), or use `benchmark`")
    if batch_size % len(ctx):
        raise UserError(f"--batch-size {batch_size} is not divisible by the {len(ctx)} devices")
    result = score(args.model_prefix, args.epoch, args.rec, ctx, batch_size, shape, pre, per_class=args.per_class,
                   classes=args.classes, preprocess_threads=args.preprocess_threads,
                   verify_checksums=args.verify_checksums, speedups=_speedups(args))
    print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  cross-entropy {result['cross_entropy']:.4f}  "
          f"images {result['images']}  {result['images_per_sec']:.1f} img/s  "
          f"(resize {result['protocol']['resize_shorter']} {pre.interpolation}, crop {shape[1]}x{shape[2]})")
    if args.per_class:
        confusion = result.pop("confusion")
        csv_path = args.confusion_csv or f"{args.model_prefix}-{args.epoch:04d}-confusion.csv"
        write_confusion_csv(csv_path, confusion, [row["name"] for row in result["per_class"]])
        for row in result["per_class"]:
            acc = "n/a" if row["top1"] is None else f"{row['top1']:.4f}"
            print(f"  class {row['class']:>4} {row['name']:<24} images {row['images']:>6}  top-1 {acc}")
        print(f"confusion matrix: {csv_path}")
        result["confusion_csv"] = csv_path
    _write_json(args.json, result)
    return 0


def _run_predict(args) -> int:
    from .evaluate import make_contexts
    from .score import predict

    resolve_export_args(args)
    shape, pre, gpus = _protocol(args)
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    results = predict(args.model_prefix, args.epoch, args.images, make_contexts(gpus, 1)[0], shape, pre,
                      args.classes, args.top_k, speedups=_speedups(args))
    for r in results:
        print(f"{r['image']}: " + "  ".join(f"{t['name']} {t['prob']:.4f}" for t in r["top"]))
    _write_json(args.json, results)
    return 0


def _run_benchmark(args) -> int:
    from .config import parse_device_list
    from .evaluate import make_contexts
    from .score import benchmark, export_protocol

    resolve_export_args(args)
    shape = _data_shape(args.data_shape, export_protocol(args.model_prefix))
    gpus = parse_device_list(args.gpus)
    batch_sizes = _batch_sizes(args.batch_size, several=True)
    rows = benchmark(args.model_prefix, args.epoch, make_contexts(gpus, 1)[:1], batch_sizes, shape, args.warmup,
                     args.repeats, speedups=_speedups(args))
    print("| batch | img/s | ms/batch (median) | ms/batch (best) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['images_per_sec']:.1f} | {r['ms_per_batch']:.1f} | "
              f"{r['best_ms_per_batch']:.1f} |")
    _write_json(args.json, {"benchmark": rows, "data_shape": shape})
    return 0


def _legacy_benchmark(argv: list[str]) -> list[str]:
    """``score.py ... --benchmark ...`` (the flag before the sub-command existed) is ``score.py benchmark ...``."""
    if "--benchmark" in argv and not (argv[:1] and argv[0] in ("score", "predict", "benchmark")):
        return ["benchmark", *(a for a in argv if a != "--benchmark")]
    return argv


def main(argv: list[str] | None = None) -> int:
    """``score.py`` / ``xception-score``: ``score`` (the default), ``predict`` or ``benchmark``."""
    setup_logging()
    argv = _legacy_benchmark(list(sys.argv[1:] if argv is None else argv))
    return run_command(build_parser(), argv, default="score")
