"""``xception-deploy`` (``python -m xception_mx.deploy``): the command line of ``deploy.py``, its parser and what
each sub-command prints; the work is done by ``deploy.py``'s functions."""
from __future__ import annotations

import argparse
import sys

from .console import OneLineParser, command_line, run_command, setup_logging
from .deploy import add_softmax_head, export_bfloat16, export_onnx, quantize_int8
from .errors import UserError
from .score_cli import add_export_flags, resolve_export_args

__all__ = ["PROG", "build_parser", "main"]

DESCRIPTION = "An export made faster or portable: INT8, bfloat16, ONNX, or with a SoftmaxOutput head."

#: The module form; ``xception-deploy`` when run as the installed script (``console.program_name``).
PROG = "python -m xception_mx.deploy"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, allow_abbrev=False, description=DESCRIPTION)
    commands = parser.add_commands()
    p = commands.add_parser("int8", help="quantize an export to INT8 (oneDNN, needs VNNI)")
    _common(p)
    p.add_argument("--calib-rec", required=True, help="calibration shards (validation images): prefix, glob or list")
    p.add_argument("--calib-mode", choices=["naive", "entropy"], default="naive",
                   help="naive: min/max of the calibration activations (entropy lost 1.4 to 40 points of top-1 on "
                        "the demo model; check any export with score.py)")
    p.add_argument("--num-calib-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="OUT_PREFIX of the INT8 export (epoch 0)")
    p.set_defaults(func=_run_int8)
    p = commands.add_parser("bfloat16", help="convert an export to bfloat16 (CPUs with avx512_bf16)")
    _common(p)
    p.add_argument("--out", required=True, help="OUT_PREFIX of the bfloat16 export (epoch 0)")
    p.set_defaults(func=_run_bfloat16)
    p = commands.add_parser("onnx", help="export to ONNX and check it with onnxruntime")
    _common(p)
    p.add_argument("--out", required=True, help="the .onnx file")
    p.add_argument("--batch-size", type=int, help="a fixed batch dimension (default: a free one)")
    p.add_argument("--dynamic-batch", action="store_true", help=argparse.SUPPRESS)  # the default now: a no-op
    p.set_defaults(func=_run_onnx)
    p = commands.add_parser("softmax-head", help="append SoftmaxOutput for MXNet's Module-API tools")
    _common(p)
    p.add_argument("--normalise-inside", action="store_true",
                   help="fold the protocol's mean/std into the graph: it takes 0-255 RGB pixels")
    p.add_argument("--out", required=True, help="OUT_PREFIX of the new export (epoch 0)")
    p.set_defaults(func=_run_softmax_head)
    return parser


def _common(p) -> None:
    add_export_flags(p)
    p.add_argument("--classes", help="class names (classes.txt) to carry to the output (default: the classes.txt "
                                     "beside the export)")


def _run_int8(args) -> int:
    resolve_export_args(args)
    if args.num_calib_images < 1 or args.batch_size < 1:
        raise UserError("--num-calib-images and --batch-size must be at least 1")
    result = quantize_int8(args.model_prefix, args.epoch, args.calib_rec, args.out, args.calib_mode,
                           args.num_calib_images, args.batch_size, args.classes)
    print(f"INT8 export: {args.out}-symbol.json, {args.out}-0000.params ({result['calib_images']} "
          f"calibration images, {args.calib_mode}); score it with: "
          f"{command_line('score.py', '--model-prefix', args.out, '--epoch', 0)} --rec VAL_SHARDS")
    return 0


def _run_bfloat16(args) -> int:
    resolve_export_args(args)
    result = export_bfloat16(args.model_prefix, args.epoch, args.out, args.classes)
    print(f"bfloat16 export: {args.out}-symbol.json, {args.out}-0000.params (on {result['images']} random images: "
          f"max |logit diff| against fp32 {result['max_abs_logit_diff']:.2e}, same top-1 {result['same_top1']}/"
          f"{result['images']}); score it with: "
          f"{command_line('score.py', '--model-prefix', args.out, '--epoch', 0)} --rec VAL_SHARDS")
    return 0


def _run_onnx(args) -> int:
    resolve_export_args(args)
    result = export_onnx(args.model_prefix, args.epoch, args.out, args.batch_size, args.classes)
    batch = f"batch {args.batch_size}" if args.batch_size else "a free batch dimension, checked at batches 1 and 4"
    print(f"ONNX: {args.out} ({batch}; max |logit diff| against MXNet {result['max_abs_logit_diff']:.2e})")
    return 0


def _run_softmax_head(args) -> int:
    resolve_export_args(args)
    result = add_softmax_head(args.model_prefix, args.epoch, args.out, normalise_inside=args.normalise_inside,
                              classes=args.classes)
    print(f"export with SoftmaxOutput 'softmax': {args.out}-symbol.json, {args.out}-0000.params; pooled "
          f"features: {result['features_layer'] or 'not named in this export'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``xception-deploy`` / ``python -m xception_mx.deploy``: 0 on success, 2 on bad input, 1 on a failed check."""
    setup_logging()
    return run_command(build_parser(), sys.argv[1:] if argv is None else argv)

