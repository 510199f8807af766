"""``verify``: check that every shard's ``.idx`` and ``.rec`` agree and every record holds a labelled image.

Per shard: each ``.idx`` line parses; its offsets, in order, start at byte 0 and each points at a valid record that
ends exactly where the next one starts (the last one at the end of the file), so the ``.rec`` has exactly as many
records as the ``.idx``; each record's header (``mx.recordio.unpack``) has one finite whole non-negative label and the
id the ``.idx`` key names; every record's bytes match the CRC-32 that ``pack`` wrote into the ``.crc`` beside the
``.idx`` (shards packed by MXNet's im2rec.py have none: said once per shard); the image header parses (Pillow, no
decode) or, with ``--decode``, the whole image decodes (OpenCV) to 3 channels without a libjpeg warning (libjpeg
decodes damaged data with a warning on stderr and gray blocks, so a warning counts as damage).
"""
from __future__ import annotations

import io
import math
import multiprocessing
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

from .headers import image_problem
from .recordfile import RecordError, read_record
from .shards import checksum_problems, duplicate_shards, idx_path_for, lookup_shards


@dataclass
class ShardReport:
    rec_path: str
    records: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (where: "index 3 (key 17)", reason)
    labels: Counter = field(default_factory=Counter)
    heights: tuple[int, int] | None = None  # (min, max)
    widths: tuple[int, int] | None = None
    checksummed: bool = False  # a .crc was there and checked


def _grow(span: tuple[int, int] | None, value: int) -> tuple[int, int]:
    return (value, value) if span is None else (min(span[0], value), max(span[1], value))


def _image_size(data: bytes, decode: bool) -> tuple[int, int]:
    """(height, width) of encoded image bytes; ValueError with the reason if unusable."""
    if decode:
        import numpy as np

        from xception_mx.installed import import_cv2

        cv2 = import_cv2()

        img, warning = _decode_watching_stderr(lambda: cv2.imdecode(np.frombuffer(data, np.uint8),
                                                                     cv2.IMREAD_UNCHANGED))
        if img is None:
            raise ValueError("image does not decode")
        if warning:
            raise ValueError(f"damaged image data (libjpeg: {warning})")
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image has {1 if img.ndim == 2 else img.shape[2]} channels, expected 3")
        return img.shape[0], img.shape[1]
    from PIL import Image

    problem = image_problem(data)  # what makes MXNet's reader die (SIGFPE), which Pillow's header parse lets by
    if problem:
        raise ValueError(problem.removeprefix("holds ").removeprefix("is "))
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[1], im.size[0]
    except Exception as e:  # Pillow raises several types for unknown or broken headers
        raise ValueError(f"image header does not parse ({type(e).__name__})") from None


def _decode_watching_stderr(decode):
    """Run ``decode()`` with file descriptor 2 captured: libjpeg reports damaged data only as a warning there."""
    import tempfile

    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            result = decode()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        text = err.read().decode("utf-8", "replace").strip()
    lines = [line for line in text.splitlines() if "JPEG" in line or "jpeg" in line]
    return result, (lines[0].strip()[:120] if lines else "")


def _check_payload(payload: bytes, key: str, decode: bool) -> tuple[int, tuple[int, int]]:
    """(label, (height, width)) of one record payload; ValueError with the reason if bad."""
    import mxnet as mx

    try:
        header, image = mx.recordio.unpack(payload)
    except Exception:
        raise ValueError("record header does not unpack") from None
    if header.flag != 0:
        raise ValueError(f"record has {header.flag} labels; xception_mx expects one")
    label = float(header.label)
    if not math.isfinite(label) or label < 0 or label != int(label):
        raise ValueError(f"label {label} is not a whole non-negative number")
    if key.lstrip("-").isdigit() and int(key) != header.id:
        raise ValueError(f".idx key {key} points at the record with id {header.id}: .idx and .rec disagree")
    return int(label), _image_size(image, decode)


def verify_shard(rec_path: str, decode: bool = False, progress: bool = False) -> ShardReport:
    """Check one shard; every problem goes into ``report.bad``."""
    import mxnet  # noqa: F401  (loaded before the progress bar starts, not inside the first record)
    from tqdm import tqdm

    report = ShardReport(rec_path)
    idx_path = idx_path_for(rec_path)
    entries: list[tuple[int, str, int]] = []  # (line number, key, offset)
    with open(idx_path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2 or not fields[1].isdigit():
                report.bad.append((f".idx line {line_no}", f"not 'key<TAB>offset': {line.strip()[:60]!r}"))
                continue
            entries.append((line_no, fields[0], int(fields[1])))
    entries.sort(key=lambda e: e[2])
    size = os.path.getsize(rec_path)
    expected_start = 0
    with open(rec_path, "rb") as f:
        for i, (_line_no, key, offset) in enumerate(tqdm(entries, desc=os.path.basename(rec_path), unit="rec",
                                                         disable=not progress, file=sys.stderr, leave=False)):
            where = f"index {i} (key {key}, byte {offset})"
            if offset != expected_start:
                gap = (f"{offset - expected_start} bytes before it are not covered by the .idx"
                       if offset > expected_start else "it overlaps the previous record")
                report.bad.append((where, gap))
            try:
                payload, expected_start = read_record(f, offset, size)
            except RecordError as e:
                report.bad.append((where, str(e)))
                expected_start = max(expected_start, _next_offset(entries, i, size))
                continue
            try:
                label, (h, w) = _check_payload(payload, key, decode)
            except ValueError as e:
                report.bad.append((where, str(e)))
                continue
            report.records += 1
            report.labels[label] += 1
            report.heights, report.widths = _grow(report.heights, h), _grow(report.widths, w)
    if expected_start < size:
        report.bad.append(("end of .rec", f"{size - expected_start} bytes after the last indexed record are not "
                                          f"covered by the .idx"))
    problems = checksum_problems(rec_path)
    report.checksummed = problems is not None
    report.bad.extend(problems or [])
    return report


def _next_offset(entries: list[tuple[int, str, int]], i: int, size: int) -> int:
    """Where the record after entry ``i`` is expected to start (the next offset, or the file end)."""
    return entries[i + 1][2] if i + 1 < len(entries) else size


def _verify_star(args: tuple[str, bool]) -> ShardReport:
    return verify_shard(*args)


def verify(spec: str, decode: bool = False, workers: int = 1, progress: bool = True
           ) -> tuple[list[ShardReport], list[str]]:
    """Reports for every shard the spec names that has an ``.idx``, plus lookup problems (missing files)."""
    import mxnet  # noqa: F401  (once here, not in every worker process)
    from tqdm import tqdm

    lookup = lookup_shards(spec)
    usable = [p for p in lookup.rec_paths if os.path.isfile(idx_path_for(p))]
    if workers > 1 and len(usable) > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(min(workers, len(usable))) as pool:
            reports = list(tqdm(pool.imap(_verify_star, [(p, decode) for p in usable]), total=len(usable),
                                desc="verify", unit="shard", disable=not progress, file=sys.stderr))
    else:
        reports = [verify_shard(p, decode, progress) for p in usable]
    by_path = {r.rec_path: r for r in reports}
    for first, copy in duplicate_shards(usable):
        by_path[copy].bad.append(("whole shard", f"holds the same records as {os.path.basename(first)}: a copied "
                                                 f"shard? remove one of them"))
    return reports, lookup.problems


def _span(span: tuple[int, int] | None) -> str:
    return "-" if span is None else (f"{span[0]}" if span[0] == span[1] else f"{span[0]}..{span[1]}")


def format_report(reports: list[ShardReport], problems: list[str], decode: bool) -> tuple[str, bool]:
    """(text, ok) for the command's output."""
    lines = []
    width = max([len(os.path.relpath(r.rec_path)) for r in reports] + [5])
    lines.append(f"{'shard':<{width}}  {'records':>8}  {'bad':>5}  {'height':>11}  {'width':>11}")
    for r in reports:
        lines.append(f"{os.path.relpath(r.rec_path):<{width}}  {r.records:>8}  {len(r.bad):>5}  "
                     f"{_span(r.heights):>11}  {_span(r.widths):>11}")
    labels: Counter = sum((r.labels for r in reports), Counter())
    total = sum(r.records for r in reports)
    heights: tuple[int, int] | None = None
    widths: tuple[int, int] | None = None
    for r in reports:
        if r.heights and r.widths:  # set together, by _grow, for each good record
            heights = _grow(_grow(heights, r.heights[0]), r.heights[1])
            widths = _grow(_grow(widths, r.widths[0]), r.widths[1])
    lines.append(f"total: {total} good records in {len(reports)} shards")
    unchecked = [r for r in reports if not r.checksummed]
    if unchecked:
        names = ", ".join(os.path.basename(r.rec_path) for r in unchecked[:3]) + (" ..." if len(unchecked) > 3 else "")
        lines.append(f"note: {len(unchecked)} shard(s) have no .crc checksum file (packed by MXNet's im2rec.py?), so "
                     f"their bytes cannot be checksum-verified: {names}")
    if labels:
        n_classes = max(labels) + 1
        counts = [labels.get(c, 0) for c in range(n_classes)]
        lo, hi = min(range(n_classes), key=counts.__getitem__), max(range(n_classes), key=counts.__getitem__)
        lines.append(f"classes: labels 0..{n_classes - 1}; records per class min {counts[lo]} (label {lo}), "
                     f"max {counts[hi]} (label {hi}), mean {total / n_classes:.1f}")
        empty = [c for c in range(n_classes) if not counts[c]]
        if empty:
            lines.append(f"note: no records for {len(empty)} labels below the largest (first: {empty[0]})")
        lines.append(f"image size: height {_span(heights)}, width {_span(widths)}"
                     + ("" if decode else " (from image headers; --decode decodes every image)"))
    bad = [(r.rec_path, where, reason) for r in reports for where, reason in r.bad]
    for problem in problems:
        lines.append(f"MISSING: {problem}")
    for rec_path, where, reason in bad:
        lines.append(f"BAD: {os.path.relpath(rec_path)} {where}: {reason}")
    ok = not bad and not problems and total > 0
    if total == 0 and not bad and not problems:
        lines.append("FAILED: the shards hold no records")
    else:
        records = len({(rec_path, where) for rec_path, where, _ in bad})  # a record can have several problems
        lines.append("OK" if ok else f"FAILED: {records} bad records, {len(problems)} missing files")
    return "\n".join(lines), ok
