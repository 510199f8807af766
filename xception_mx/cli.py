"""Entry points of the console scripts: parse, call the package, turn known failures into one stderr line."""
from __future__ import annotations

import logging
import sys

__all__ = ["train_main", "score_main", "setup_logging", "run_cli", "choose_engine", "with_saved_config"]

#: Exit codes: 1 = the run failed (e.g. non-finite loss), 2 = bad input, 130 = stopped by a signal.
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("xception_mx")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def run_cli(prog: str, body) -> int:
    """Run ``body()``; known errors become ``prog: error: <one line>`` on stderr and a non-zero exit code."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .train import Interrupted, TrainingError

    try:
        return body() or 0
    except (ConfigError, CheckpointError, DataError, OSError) as exc:  # OSError: unwritable output, disk full
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def with_saved_config(argv: list[str] | None) -> list[str]:
    """On --resume or --model-load-epoch (with or without --retrain) and no --config, the run's config.yaml is the base.

    So ``train_xception.py --output-dir DIR --resume`` alone continues a run as it was configured (model, prefix,
    data, schedule), and ``--output-dir DIR --retrain --model-load-epoch N --lr X`` changes only the schedule;
    flags given with them override the saved values.
    """
    import os

    from .config import ConfigError, build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        namespace = vars(build_parser().parse_args(argv))
    except (ConfigError, SystemExit):
        return argv  # reported by the real parse
    continuing = "resume" in namespace or "model_load_epoch" in namespace
    if not continuing or namespace.get("config"):
        return argv
    saved = os.path.join(namespace.get("output_dir", "runs/xception"), "config.yaml")
    return ["--config", saved, *argv] if os.path.isfile(saved) else argv


#: Keys that define the optimiser and schedule: a resume continues the saved ones, --retrain starts new ones.
SCHEDULE_KEYS = ("optimizer", "lr", "lr_mode", "lr_decay", "lr_decay_period", "lr_step_epochs", "poly_power",
                 "target_lr", "warmup_epochs", "warmup_lr")


def check_resume_flags(argv: list[str]) -> None:
    """A resume that is given a different optimiser or schedule would silently ignore it: refuse instead."""
    import os

    from .config import ConfigError, build_parser, load_yaml, resolve

    namespace = vars(build_parser().parse_args(argv))
    resuming = "resume" in namespace or ("model_load_epoch" in namespace and not namespace.get("retrain"))
    path = namespace.pop("config", None)
    if not resuming or not path or not os.path.isfile(path):
        return
    saved = resolve(load_yaml(path))
    given = resolve(load_yaml(path), namespace)
    changed = [k for k in SCHEDULE_KEYS if k in namespace and given[k] != saved[k]]
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        raise ConfigError(f"{flag} with --resume: a resume continues the saved optimiser and schedule exactly; to "
                          f"start a new one from epoch N use --retrain --model-load-epoch N {flag} ...")


def choose_engine(argv: list[str]) -> None:
    """Select MXNet's serial engine for deterministic runs; must run before ``import mxnet``.

    Workaround for apache/mxnet#13829: MXNet's threaded engine reorders floating-point work between runs, so two
    identical CPU runs differ in the last bits after a few steps (and an exact resume is impossible). The serial
    NaiveEngine makes them bit-identical, at no measurable cost on CPU. MXNet reads MXNET_ENGINE_TYPE once, at
    load; a value the user set is left alone. Bad arguments are ignored here and reported by the real parse.
    """
    import os

    from .config import ConfigError, build_parser, load_yaml, resolve, wants_serial_engine

    if "mxnet" in sys.modules or "MXNET_ENGINE_TYPE" in os.environ:
        return
    try:
        namespace = vars(build_parser().parse_args(argv))
        path = namespace.pop("config", None)
        config = resolve(load_yaml(path) if path else {}, namespace)
    except (ConfigError, OSError, SystemExit):
        return
    if wants_serial_engine(config):
        os.environ["MXNET_ENGINE_TYPE"] = "NaiveEngine"


def train_main(argv: list[str] | None = None) -> int:
    """``train_xception.py`` / ``train-xception``."""
    argv = with_saved_config(argv)
    choose_engine(argv)
    from .train import build_config, train

    setup_logging()

    def body():
        check_resume_flags(argv)
        train(build_config(argv))

    return run_cli("train_xception.py", body)


def _score_parser(predict: bool):
    import argparse

    from .config import _OneLineParser

    prog = "score.py predict" if predict else "score.py"
    parser = _OneLineParser(prog=prog, allow_abbrev=False, description=(
        "Top-k classes of images under the validation protocol." if predict else
        "Score an exported checkpoint on RecordIO shards: top-1, top-5, cross-entropy, img/s. "
        "`score.py predict -h` for single images."))
    parser.add_argument("--model-prefix", required=True, help="PREFIX of PREFIX-symbol.json / PREFIX-NNNN.params")
    parser.add_argument("--epoch", type=int, required=True, help="NNNN of PREFIX-NNNN.params")
    parser.add_argument("--gpus", default="", help="GPU ids, e.g. 0,1; empty = CPU")
    parser.add_argument("--data-shape", help="C,H,W (default: the training config beside the checkpoint, "
                                             "else 3,299,299)")
    parser.add_argument("--crop-pct", type=float, help="resize shorter side to H / crop_pct, then centre crop "
                                                       "(default: training config, else 0.8975)")
    parser.add_argument("--mean", help="R,G,B mean on the 0-255 scale (default: training config, else 127.5)")
    parser.add_argument("--std", help="R,G,B std on the 0-255 scale (default: training config, else 127.5)")
    parser.add_argument("--classes", help="classes.txt from `im2rec-tools make-list` for class names")
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
        parser.add_argument("--confusion-csv", help="where --per-class writes the confusion matrix "
                                                    "(default: PREFIX-NNNN-confusion.csv)")
        parser.add_argument("--benchmark", action="store_true", help="time synthetic batches instead of scoring")
        parser.add_argument("--warmup", type=int, default=3)
        parser.add_argument("--repeats", type=int, default=10)
    return parser


def _protocol(args) -> tuple:
    from .config import parse_device_list
    from .score import ScoreError, protocol_defaults

    saved = protocol_defaults(args.model_prefix)

    def floats(text, name, default):
        if text is None:
            return list(default)
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise ScoreError(f"--{name} must be comma-separated numbers, got {text!r}") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise ScoreError(f"--{name} needs 1 or 3 values, got {text!r}")
        return values

    if args.data_shape:
        try:
            shape = tuple(int(v) for v in args.data_shape.split(","))
        except ValueError:
            raise ScoreError(f"--data-shape must be C,H,W integers, got {args.data_shape!r}") from None
        if len(shape) != 3 or min(shape) < 1:
            raise ScoreError(f"--data-shape must be C,H,W positive integers, got {args.data_shape!r}")
    else:
        shape = tuple(saved.get("data_shape", (3, 299, 299)))
    crop_pct = args.crop_pct if args.crop_pct is not None else float(saved.get("crop_pct", 0.8975))
    if not 0 < crop_pct <= 1:
        raise ScoreError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    mean = floats(args.mean, "mean", saved.get("mean", [127.5] * 3))
    std = floats(args.std, "std", saved.get("std", [127.5] * 3))
    if min(std) <= 0:
        raise ScoreError("--std values must be > 0")
    gpus = parse_device_list(args.gpus)
    return shape, crop_pct, mean, std, gpus


def score_main(argv: list[str] | None = None) -> int:
    """``score.py`` / ``xception-score``: score, --benchmark, or `predict`."""
    import json

    from .checkpoint import atomic_write_text
    from .score import ScoreError, benchmark, predict, read_classes, score, write_confusion_csv
    from .train import make_contexts

    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    is_predict = bool(argv) and argv[0] == "predict"

    def body():
        args = _score_parser(is_predict).parse_args(argv[1:] if is_predict else argv)
        shape, crop_pct, mean, std, gpus = _protocol(args)
        if is_predict:
            ctx = make_contexts(gpus, 1)
            results = predict(args.model_prefix, args.epoch, args.images, ctx[0], shape, crop_pct, mean, std,
                              args.classes, args.top_k)
            for r in results:
                tops = "  ".join(f"{t['name']} {t['prob']:.4f}" for t in r["top"])
                print(f"{r['image']}: {tops}")
            if args.json:
                atomic_write_text(args.json, json.dumps(results, indent=1))
            return 0
        try:
            batch_sizes = [int(v) for v in args.batch_size.split(",")]
        except ValueError:
            raise ScoreError(f"--batch-size must be an integer (or a list with --benchmark), "
                             f"got {args.batch_size!r}") from None
        if min(batch_sizes) < 1 or (len(batch_sizes) > 1 and not args.benchmark):
            raise ScoreError(f"--batch-size must be one positive integer when scoring, got {args.batch_size!r}")
        ctx = make_contexts(gpus, args.cpus)
        if args.benchmark:
            rows = benchmark(args.model_prefix, args.epoch, ctx[:1], batch_sizes, shape, args.warmup, args.repeats)
            print("| batch | img/s | ms/batch (median) | ms/batch (best) |\n|---|---|---|---|")
            for r in rows:
                print(f"| {r['batch_size']} | {r['images_per_sec']:.1f} | {r['ms_per_batch']:.1f} | "
                      f"{r['best_ms_per_batch']:.1f} |")
            if args.json:
                atomic_write_text(args.json, json.dumps({"benchmark": rows, "data_shape": shape}, indent=1))
            return 0
        if not args.rec:
            raise ScoreError("--rec is required (the validation shards), or use --benchmark")
        if batch_sizes[0] % len(ctx):
            raise ScoreError(f"--batch-size {batch_sizes[0]} is not divisible by the {len(ctx)} devices")
        result = score(args.model_prefix, args.epoch, args.rec, ctx, batch_sizes[0], shape, crop_pct, mean, std,
                       per_class=args.per_class, classes=args.classes, preprocess_threads=args.preprocess_threads)
        print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  cross-entropy {result['cross_entropy']:.4f}  "
              f"images {result['images']}  {result['images_per_sec']:.1f} img/s  "
              f"(resize {result['protocol']['resize_shorter']}, crop {shape[1]}x{shape[2]})")
        if args.per_class:
            confusion = result.pop("confusion")
            csv_path = args.confusion_csv or f"{args.model_prefix}-{args.epoch:04d}-confusion.csv"
            names = read_classes(args.classes, result["num_classes"])
            write_confusion_csv(csv_path, confusion, names)
            for row in result["per_class"]:
                acc = "n/a" if row["top1"] is None else f"{row['top1']:.4f}"
                print(f"  class {row['class']:>4} {row['name']:<24} images {row['images']:>6}  top-1 {acc}")
            print(f"confusion matrix: {csv_path}")
            result["confusion_csv"] = csv_path
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=1))
        return 0

    return run_cli("score.py predict" if is_predict else "score.py", body)
