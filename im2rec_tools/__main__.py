"""Command line: ``im2rec-tools`` (or ``python -m im2rec_tools``) ``build | make-list | pack | verify | demo-digits``.

Exit codes: 0 success; 1 ``verify`` found damaged or missing shards; 2 bad input (one ``error:`` line on stderr,
nothing half-written); 130 interrupted (rerun the same command to finish).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from xception_mx.console import OneLineParser, command_line, run_command
from xception_mx.errors import UserError

#: The module form; ``im2rec-tools`` when run as the installed script (``console.program_name``).
PROG = "python -m im2rec_tools"


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def _quality(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{value} is above 100")
    return value


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG,
                           description="Build, check and demo the RecordIO image shards xception_mx trains on.")
    commands = parser.add_commands()
    _add_build(commands)
    _add_make_list(commands)
    _add_pack(commands)
    _add_verify(commands)
    _add_demo_digits(commands)
    return parser


def _list_flags(p: argparse.ArgumentParser) -> None:
    """``make-list``'s options (``build`` takes them too)."""
    p.add_argument("--val-ratio", type=_ratio, default=0.1, help="share of each class held out for val (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the train order (default 0)")
    p.add_argument("--labels", metavar="FILE.csv", help="flat folder: 'relative_path,class_name' rows")
    p.add_argument("--classes", metavar="CLASSES.txt",
                   help="reuse this class table (e.g. train's) so labels match; default: the sorted class names found")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept --labels paths outside IMAGE_ROOT (absolute, or with ..)")


def _pack_flags(p: argparse.ArgumentParser, shards: str) -> None:
    """``pack``'s options (``build`` takes them too)."""
    p.add_argument("--shards", type=_int_at_least(1), default=1, help=shards)
    p.add_argument("--resize", type=_int_at_least(0), default=0, metavar="SHORTER_SIDE",
                   help="shrink so the shorter side is this many pixels; never upscales (default 0: keep size)")
    p.add_argument("--quality", type=_quality, default=95, help="JPEG quality 1-100 (default 95)")
    p.add_argument("--workers", type=_int_at_least(1), default=min(4, os.cpu_count() or 1),
                   help="encoding processes (default: min(4, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="rebuild complete shards too")


def _add_build(commands) -> None:
    p = commands.add_parser("build", help="make-list + pack + verify: an image folder to train/val shards",
                            description="Run make-list, pack and verify in one go: IMAGE_ROOT (one sub-folder per "
                                        "class, or a flat folder with --labels) becomes OUT/train-*.rec and "
                                        "OUT/val-*.rec (with .idx and .crc), OUT/classes.txt and the lists "
                                        "OUT/train.lst, OUT/val.lst; then the command that trains on them. Complete "
                                        "shards from an earlier run are left alone: give --overwrite after IMAGE_ROOT "
                                        "changed.")
    p.add_argument("image_root", metavar="IMAGE_ROOT")
    p.add_argument("out_dir", metavar="OUT")
    _list_flags(p)
    _pack_flags(p, "training shards (default 1); the val shards follow the split's ratio (at least 1)")
    p.add_argument("--decode", action="store_true", help="verify: decode every image too (slower)")
    p.set_defaults(func=_run_build)


def _add_make_list(commands) -> None:
    p = commands.add_parser("make-list", help="write train/val .lst image lists and the class table",
                            description="Walk IMAGE_ROOT (one sub-folder per class; .jpg/.jpeg/.png/.bmp at any depth) "
                                        "or a flat folder with --labels, and write OUT_PREFIX_train.lst, "
                                        "OUT_PREFIX_val.lst (stratified split; --val-ratio 0 writes OUT_PREFIX.lst) "
                                        "and OUT_PREFIX_classes.txt.")
    p.add_argument("image_root", metavar="IMAGE_ROOT")
    p.add_argument("out_prefix", metavar="OUT_PREFIX")
    _list_flags(p)
    p.set_defaults(func=_run_make_list)


def _add_pack(commands) -> None:
    p = commands.add_parser("pack", help="pack an image list into RecordIO shards",
                            description="Pack LST into OUT_PREFIX-0000i-of-0000N.rec/.idx: 3-channel JPEGs, "
                                        "unreadable files skipped and listed in OUT_PREFIX-skipped.txt. "
                                        "Complete shards from an earlier run are left alone.")
    p.add_argument("lst", metavar="LST")
    p.add_argument("out_prefix", metavar="OUT_PREFIX")
    p.add_argument("--image-root", required=True, metavar="ROOT", help="folder the list's paths are relative to")
    _pack_flags(p, "number of shards (default 1)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept list paths outside --image-root (absolute, or with ..)")
    p.set_defaults(func=_run_pack)


def _add_verify(commands) -> None:
    p = commands.add_parser("verify", help="check shards record by record",
                            description="Check every shard matched by PREFIX_OR_GLOB (a prefix, a glob, a .rec, or "
                                        "';'-separated list): .idx and .rec agree, every record reads, labels and "
                                        "image headers are valid. Exit 0 if all is well, 1 otherwise.")
    p.add_argument("spec", metavar="PREFIX_OR_GLOB")
    p.add_argument("--decode", action="store_true", help="decode every image too (slower)")
    p.add_argument("--workers", type=_int_at_least(1), default=1, help="shards checked in parallel (default 1)")
    p.set_defaults(func=_run_verify)


def _add_demo_digits(commands) -> None:
    p = commands.add_parser("demo-digits", help="scikit-learn's handwritten digits as train/val shards",
                            description="Write scikit-learn's 1,797 bundled 8x8 digit scans as JPEGs under "
                                        "OUT_DIR/images and pack them into OUT_DIR/train-*.rec, OUT_DIR/val-*.rec "
                                        "(20%% seeded val split) with OUT_DIR/classes.txt.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--size", type=_int_at_least(8), default=80, help="image side in pixels (default 80)")
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9",
                   help="digits to keep, labelled 0..K-1 in this order (default 0,...,9)")
    p.add_argument("--shards", type=_int_at_least(1), default=2, help="shards per split (default 2)")
    p.set_defaults(func=_run_demo_digits)


def _run_make_list(args) -> int:
    from .listing import make_lists

    written, notes = make_lists(args.image_root, args.out_prefix, args.val_ratio, args.seed, args.labels,
                                args.classes, args.allow_outside_root)
    _print_lists(written, notes)
    return 0


def _print_lists(written: dict[str, list], notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for path, rows in written.items():
        kind = "classes" if path.endswith(".txt") else "images"
        print(f"wrote {path}: {len(rows)} {kind}")


def _run_pack(args) -> int:
    from .packing import pack

    result = pack(args.lst, args.out_prefix, args.image_root, args.shards, args.resize, args.quality, args.workers,
                  args.overwrite, allow_outside=args.allow_outside_root)
    _print_pack(result)
    return 0


def _print_pack(result) -> None:
    left_alone = [s for s in result.shards if not s.built]
    for shard in result.shards if len(result.shards) <= 16 else left_alone[:16]:
        state = "built" if shard.built else "already complete, left alone"
        print(f"{shard.rec_path}: {shard.records} records ({state})")
    if len(result.shards) > 16 and len(left_alone) > 16:
        print(f"... and {len(left_alone) - 16} more shards left alone")
    built = len(result.shards) - len(left_alone)
    print(f"pack: {sum(s.records for s in result.shards)} records in {len(result.shards)} shards "
          f"({built} built, {len(result.shards) - built} left alone)")
    skipped = result.skipped
    if skipped:
        print(f"pack: skipped {len(skipped)} unreadable files, listed with reasons in {result.skipped_file}")
    else:
        print("pack: skipped 0 files")


def _run_build(args) -> int:
    """make-list, pack (train, then val) and verify into OUT, each step printed as its own command prints it; then
    the command that trains on the shards (exit 1, and no command, when verify finds a problem)."""
    from .packing import pack
    from .verify import format_report, verify

    lists = _build_lists(args)
    for split in ("train", "val"):
        n_images = len(lists[split][1])
        shards = args.shards if split == "train" else round(args.shards * args.val_ratio / (1 - args.val_ratio))
        result = pack(lists[split][0], os.path.join(args.out_dir, split), args.image_root,
                      min(max(shards, 1), n_images), args.resize, args.quality, args.workers, args.overwrite,
                      allow_outside=args.allow_outside_root)
        _print_pack(result)
    spec = ";".join(os.path.join(args.out_dir, split) for split in ("train", "val"))
    reports, problems = verify(spec, args.decode, args.workers)
    text, ok = format_report(reports, problems, args.decode)
    print(text)
    if not ok:
        return 1
    run = os.path.join("runs", os.path.basename(os.path.normpath(args.out_dir)))
    command = command_line("train_xception.py", "--data-dir", args.out_dir, "--model", "xception",
                           "--output-dir", run)
    print(f"build: done; train on these shards with:\n  {command}")
    return 0


def _build_lists(args) -> dict[str, tuple[str, list]]:
    """``make-list`` into OUT as ``train.lst``, ``val.lst`` and ``classes.txt`` (the name the trainer reads beside
    the shards): {split: (list path, entries)}."""
    from .listing import list_outputs, make_lists

    if args.val_ratio == 0:
        raise UserError("--val-ratio 0 holds out no images, and training needs validation shards: give e.g. "
                        "--val-ratio 0.1")
    prefix = os.path.join(args.out_dir, ".build")
    written, notes = make_lists(args.image_root, prefix, args.val_ratio, args.seed, args.labels, args.classes,
                                args.allow_outside_root)
    final = {}
    for key, path in list_outputs(prefix, args.val_ratio).items():
        target = os.path.join(args.out_dir, "classes.txt" if key == "classes" else f"{key}.lst")
        os.replace(path, target)
        final[key] = (target, written[path])
    _print_lists(dict(final.values()), notes)
    if not final["val"][1]:
        raise UserError(f"--val-ratio {args.val_ratio} held out no image: each class keeps at least one training "
                        f"image, and these classes are too small; raise --val-ratio or add images")
    return final


def _run_verify(args) -> int:
    from .verify import format_report, verify

    reports, problems = verify(args.spec, args.decode, args.workers)
    text, ok = format_report(reports, problems, args.decode)
    print(text)
    return 0 if ok else 1


def _run_demo_digits(args) -> int:
    from .digits import describe, make_demo_digits, parse_digits

    digits = parse_digits(args.digits)
    result = make_demo_digits(args.out_dir, args.size, digits, args.shards)
    print(describe(result, digits, args.size))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (bad input: one line on stderr, code 2)."""
    return run_command(build_parser(), sys.argv[1:] if argv is None else argv,
                       interrupted_hint="complete outputs are kept, rerun the same command to finish")


if __name__ == "__main__":
    sys.exit(main())
