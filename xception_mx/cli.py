"""Console entry points ``train-xception`` and ``xception-score``: parse, call the package, report in one line.

Training: ``plan_run`` decides everything (parsing once, before MXNet loads), the engine variable is exported,
then the trainer is imported and run. Failures become one stderr line through ``console.run_cli``.
"""
from __future__ import annotations

import os
import sys

from .console import OneLineParser, run_cli, setup_logging
from .errors import UserError

__all__ = ["train_main", "score_main"]

TRAIN_PROG = "train_xception.py"


def train_main(argv: list[str] | None = None) -> int:
    """``train_xception.py`` / ``train-xception``: plan, set MXNet's engine, import the trainer, train."""
    setup_logging()
    plans = []

    def plan() -> None:
        from .plan import plan_run

        plans.append(plan_run(argv))

    code = run_cli(TRAIN_PROG, plan)
    if code:
        return code
    run_plan = plans[0]
    if "mxnet" not in sys.modules:  # MXNet (and its oneDNN) read these once, when they load
        os.environ.setdefault("MXNET_ENGINE_TYPE", run_plan.engine)
        if run_plan.config["amp"] == "bfloat16":
            from .cpuinfo import enable_amx

            run_plan.notes.append(f"bfloat16: {enable_amx(os.environ)}")

    def train() -> None:
        from .train import Trainer

        Trainer(run_plan).fit()

    return run_cli(TRAIN_PROG, train)


def _score_parser(predict: bool):
    prog = "score.py predict" if predict else "score.py"
    parser = OneLineParser(prog=prog, allow_abbrev=False, description=(
        "Top-k classes of images under the validation protocol." if predict else
        "Score an exported checkpoint on RecordIO shards: top-1, top-5, cross-entropy, img/s. "
        "`score.py predict -h` for single images."))
    parser.add_argument("--model-prefix", required=True, help="PREFIX of PREFIX-symbol.json / PREFIX-NNNN.params")
    parser.add_argument("--epoch", type=int, required=True, help="NNNN of PREFIX-NNNN.params")
    parser.add_argument("--gpus", default="", help="GPU ids, e.g. 0,1; empty = CPU")
    parser.add_argument("--data-shape", help="C,H,W (default: the export's protocol, PREFIX-preprocess.json, "
                                             "else 3,299,299)")
    parser.add_argument("--crop-pct", type=float, help="resize shorter side to H / crop_pct, then centre crop "
                                                       "(default: the export's protocol, else 0.8975)")
    parser.add_argument("--interpolation", choices=["bilinear", "bicubic"],
                        help="resize interpolation (default: the export's protocol, else bilinear)")
    parser.add_argument("--mean", help="R,G,B mean on the 0-255 scale (default: the export's protocol, else 127.5)")
    parser.add_argument("--std", help="R,G,B std on the 0-255 scale (default: the export's protocol, else 127.5)")
    parser.add_argument("--classes", help="classes.txt from `im2rec-tools make-list` for class names")
    parser.add_argument("--no-fuse", action="store_true", help="run the graph as exported (on CPU the default lets "
                                                               "oneDNN fuse it: same logits within 1e-5, faster)")
    if predict:
        parser.add_argument("images", nargs="+", help="image files")
        parser.add_argument("--top-k", type=int, default=5)
        parser.add_argument("--json", help="also write the predictions here")
    else:
        parser.add_argument("--rec", help="validation shards: a prefix, a glob or a ';'-separated list")
        parser.add_argument("--batch-size", default="32", help="batch size (with --benchmark: a list, e.g. 1,8,32)")
        parser.add_argument("--cpus", type=int, default=1, help="CPU contexts when no GPU is given")
        parser.add_argument("--preprocess-threads", type=int, default=4)
        parser.add_argument("--json", help="write the figures and the protocol here")
        parser.add_argument("--per-class", action="store_true", help="per-class accuracy and a confusion matrix")
        parser.add_argument("--verify-checksums", action="store_true",
                            help="check every record against the shards' .crc checksums first")
        parser.add_argument("--confusion-csv", help="where --per-class writes the confusion matrix "
                                                    "(default: PREFIX-NNNN-confusion.csv)")
        parser.add_argument("--benchmark", action="store_true", help="time synthetic batches instead of scoring")
        parser.add_argument("--warmup", type=int, default=3)
        parser.add_argument("--repeats", type=int, default=10)
    return parser


def _protocol(args) -> tuple:
    """(data shape, Preprocess): the export's own protocol, each flag given overriding its part."""
    import dataclasses

    from .config import parse_device_list
    from .score import export_protocol

    saved = export_protocol(args.model_prefix)

    def floats(text, name):
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise UserError(f"--{name} must be comma-separated numbers, got {text!r}") from None
        if len(values) not in (1, 3):
            raise UserError(f"--{name} needs 1 or 3 values, got {text!r}")
        return tuple(values * 3 if len(values) == 1 else values)

    shape = (3, saved.input_size, saved.input_size)
    if args.data_shape:
        try:
            shape = tuple(int(v) for v in args.data_shape.split(","))
        except ValueError:
            raise UserError(f"--data-shape must be C,H,W integers, got {args.data_shape!r}") from None
        if len(shape) != 3 or min(shape) < 1:
            raise UserError(f"--data-shape must be C,H,W positive integers, got {args.data_shape!r}")
    changes = {"input_size": max(shape[1:])}
    if args.crop_pct is not None:
        if not 0 < args.crop_pct <= 1:
            raise UserError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
        changes["crop_pct"] = args.crop_pct
    if args.mean:
        changes["mean"] = floats(args.mean, "mean")
    if args.std:
        changes["std"] = floats(args.std, "std")
        if min(changes["std"]) <= 0:
            raise UserError("--std values must be > 0")
    if args.interpolation:
        changes["interpolation"] = args.interpolation
    return shape, dataclasses.replace(saved, **changes), parse_device_list(args.gpus)


def score_main(argv: list[str] | None = None) -> int:
    """``score.py`` / ``xception-score``: score, --benchmark, or `predict`."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    is_predict = bool(argv) and argv[0] == "predict"

    def body() -> int:
        args = _score_parser(is_predict).parse_args(argv[1:] if is_predict else argv)
        shape, pre, gpus = _protocol(args)
        if is_predict:
            if args.top_k < 1:
                raise UserError(f"--top-k must be at least 1, got {args.top_k}")
            return _predict(args, shape, pre, gpus)
        try:
            batch_sizes = [int(v) for v in args.batch_size.split(",")]
        except ValueError:
            raise UserError(f"--batch-size must be an integer (or a list with --benchmark), "
                            f"got {args.batch_size!r}") from None
        if min(batch_sizes) < 1 or (len(batch_sizes) > 1 and not args.benchmark):
            raise UserError(f"--batch-size must be one positive integer when scoring, got {args.batch_size!r}")
        from .evaluate import make_contexts

        ctx = make_contexts(gpus, args.cpus)
        if args.benchmark:
            return _benchmark(args, ctx, batch_sizes, shape)
        return _score(args, ctx, batch_sizes[0], shape, pre)

    return run_cli("score.py predict" if is_predict else "score.py", body)


def _write_json(path: str | None, obj) -> None:
    if path:
        import json

        from .fileio import atomic_write_text

        atomic_write_text(path, json.dumps(obj, indent=1))


def _predict(args, shape, pre, gpus) -> int:
    from .evaluate import make_contexts
    from .score import predict

    results = predict(args.model_prefix, args.epoch, args.images, make_contexts(gpus, 1)[0], shape, pre,
                      args.classes, args.top_k, fuse=not args.no_fuse)
    for r in results:
        print(f"{r['image']}: " + "  ".join(f"{t['name']} {t['prob']:.4f}" for t in r["top"]))
    _write_json(args.json, results)
    return 0


def _benchmark(args, ctx, batch_sizes, shape) -> int:
    from .score import benchmark

    rows = benchmark(args.model_prefix, args.epoch, ctx[:1], batch_sizes, shape, args.warmup, args.repeats,
                     fuse=not args.no_fuse)
    print("| batch | img/s | ms/batch (median) | ms/batch (best) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['images_per_sec']:.1f} | {r['ms_per_batch']:.1f} | "
              f"{r['best_ms_per_batch']:.1f} |")
    _write_json(args.json, {"benchmark": rows, "data_shape": shape})
    return 0


def _score(args, ctx, batch_size, shape, pre) -> int:
    from .records import read_classes
    from .score import score, write_confusion_csv

    if not args.rec:
        raise UserError("--rec is required (the validation shards), or use --benchmark")
    if batch_size % len(ctx):
        raise UserError(f"--batch-size {batch_size} is not divisible by the {len(ctx)} devices")
    result = score(args.model_prefix, args.epoch, args.rec, ctx, batch_size, shape, pre, per_class=args.per_class,
                   classes=args.classes, preprocess_threads=args.preprocess_threads,
                   verify_checksums=args.verify_checksums, fuse=not args.no_fuse)
    print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  cross-entropy {result['cross_entropy']:.4f}  "
          f"images {result['images']}  {result['images_per_sec']:.1f} img/s  "
          f"(resize {result['protocol']['resize_shorter']} {pre.interpolation}, crop {shape[1]}x{shape[2]})")
    if args.per_class:
        confusion = result.pop("confusion")
        csv_path = args.confusion_csv or f"{args.model_prefix}-{args.epoch:04d}-confusion.csv"
        write_confusion_csv(csv_path, confusion, read_classes(args.classes, result["num_classes"]))
        for row in result["per_class"]:
            acc = "n/a" if row["top1"] is None else f"{row['top1']:.4f}"
            print(f"  class {row['class']:>4} {row['name']:<24} images {row['images']:>6}  top-1 {acc}")
        print(f"confusion matrix: {csv_path}")
        result["confusion_csv"] = csv_path
    _write_json(args.json, result)
    return 0
