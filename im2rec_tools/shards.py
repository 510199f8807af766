"""Shard names, shard lookup and ``.idx`` index files: the on-disk contract shared by ``pack``, ``verify`` and
``xception_mx.data``.

A shard set is ``PREFIX-00000-of-00004.rec`` .. ``PREFIX-00003-of-00004.rec``, each with its ``.idx`` beside it (the
``.idx`` is written last and marks the shard complete). A lone ``PREFIX.rec`` (what MXNet's im2rec writes) also works.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import re
import tempfile
import time
import zlib
from dataclasses import dataclass, field

from xception_mx.errors import UserError
from xception_mx.fileio import atomic_write_text

from .recordfile import RecordError, read_record

SHARD_PATTERN = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.rec$")


def shard_path(prefix: str, index: int, count: int, ext: str = "rec") -> str:
    """``PREFIX-00001-of-00004.rec`` for shard 1 of 4."""
    return f"{prefix}-{index:05d}-of-{count:05d}.{ext}"


def idx_path_for(rec_path: str) -> str:
    """The index file that belongs to a ``.rec`` file."""
    return rec_path[:-len(".rec")] + ".idx" if rec_path.endswith(".rec") else rec_path + ".idx"


@dataclass
class ShardLookup:
    """The ``.rec`` files a spec names (absolute, sorted) and every problem found with them (one line each)."""
    rec_paths: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _missing_siblings(matched: list[str], wanted) -> list[str]:
    """Problems for shard sets with holes (a shard absent) or mixed shard counts among ``matched`` paths."""
    groups: dict[str, dict[int, set[int]]] = {}
    for path in matched:
        m = SHARD_PATTERN.match(path)
        if m:
            groups.setdefault(m["base"], {}).setdefault(int(m["count"]), set()).add(int(m["index"]))
    problems = []
    for base, by_count in sorted(groups.items()):
        if len(by_count) > 1:
            counts = " and ".join(f"-of-{c:05d}" for c in sorted(by_count))
            problems.append(f"{base}: shards from two different packs ({counts}); delete the stale set")
            continue
        (count, present), = by_count.items()
        for i in sorted(present):
            if i >= count:
                problems.append(f"{shard_path(base, i, count)}: shard number {i} is not below its count {count}")
        for i in range(count):
            candidate = shard_path(base, i, count)
            if i not in present and wanted(candidate):
                problems.append(f"{candidate} is missing: rerun `im2rec-tools pack` to build the missing shards")
    return problems


def _resolve_one(part: str) -> tuple[list[str], list[str]]:
    if glob.has_magic(part):
        matched = sorted(p for p in glob.glob(part) if p.endswith(".rec") and os.path.isfile(p))
        if not matched:
            raise UserError(f"no .rec files match {part!r}")
        return matched, _missing_siblings(matched, lambda c: fnmatch.fnmatchcase(c, part))
    if part.endswith(".rec"):
        if not os.path.isfile(part):
            raise UserError(f"shard file {part} does not exist")
        return [part], []
    if os.path.isdir(part):
        raise UserError(f"{part} is a folder: give a shard prefix such as {os.path.join(part, 'train')}")
    folder = os.path.dirname(part) or "."
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder} does not exist (shard prefix {part!r})")
    own = re.compile(re.escape(os.path.basename(part)) + r"-\d{5}-of-\d{5}\.rec$")
    matched = sorted(os.path.join(os.path.dirname(part), name) for name in os.listdir(folder) if own.match(name))
    if matched:
        return matched, _missing_siblings(matched, lambda c: True)
    if os.path.isfile(part + ".rec"):
        return [part + ".rec"], []
    raise UserError(f"no shards for prefix {part!r}: looked for {part}-NNNNN-of-NNNNN.rec and {part}.rec")


def lookup_shards(spec: str) -> ShardLookup:
    """Resolve a shard spec: a prefix, a glob, a ``.rec`` path, or a ``;``-separated list of those.

    Raises UserError when a part matches nothing; holes in a numbered set, mixed sets and ``.rec`` files without
    their ``.idx`` come back as ``problems`` so that ``verify`` can list them all.
    """
    parts = [p.strip() for p in str(spec).split(";") if p.strip()]
    if not parts:
        raise UserError("empty shard spec: give a shard prefix such as data/train, a glob or a .rec path")
    found: list[str] = []
    problems: list[str] = []
    for part in parts:
        matched, part_problems = _resolve_one(os.path.expanduser(part))
        found.extend(matched)
        problems.extend(p for p in part_problems if p not in problems)
    rec_paths = sorted({os.path.abspath(p) for p in found})
    for rec in rec_paths:
        if ";" in rec:
            problems.append(f"{rec}: MXNet cannot read a path containing ';' (it separates shard paths); rename it")
        if not os.path.isfile(idx_path_for(rec)):
            problems.append(f"{rec} has no index {os.path.basename(idx_path_for(rec))}: rerun `im2rec-tools pack` "
                            f"(it rebuilds only incomplete shards)")
    return ShardLookup(rec_paths, problems)


# ----------------------------------------------------------------------------------------------------------- indexes

_INDEX_CACHE: dict[tuple, list[int]] = {}


def _stat_key(*paths: str) -> tuple:
    return tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)


def read_offsets(rec_path: str) -> list[int]:
    """Record offsets listed in ``rec_path``'s ``.idx``, ascending; UserError if the index is unusable.

    Checks what is cheap at every start: well-formed lines, no duplicate offsets, the first record at byte 0 and the
    last record ending exactly at the end of the ``.rec`` (so a truncated or half-copied shard is refused).
    ``im2rec-tools verify`` checks every record.
    """
    idx_path = idx_path_for(rec_path)
    try:
        key = _stat_key(rec_path, idx_path)
    except FileNotFoundError as e:
        raise UserError(f"{e.filename} does not exist") from None
    if key in _INDEX_CACHE:
        return _INDEX_CACHE[key]
    offsets = []
    with open(idx_path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            try:
                if len(fields) != 2:
                    raise ValueError
                offsets.append(int(fields[1]))
            except ValueError:
                raise UserError(f"{idx_path} line {line_no} is not 'key<TAB>offset': {line.strip()[:60]!r}") from None
    offsets.sort()
    rec_size = key[0][1]
    if offsets:
        if len(set(offsets)) != len(offsets):
            raise UserError(f"{idx_path} lists the same record offset twice: run `im2rec-tools verify` on it")
        if offsets[0] != 0:
            raise UserError(f"{idx_path} does not start at byte 0 of {os.path.basename(rec_path)}: "
                             f"run `im2rec-tools verify` on it")
        try:
            with open(rec_path, "rb") as f:
                _, end = read_record(f, offsets[-1], rec_size)
        except RecordError as e:
            raise UserError(f"{rec_path}: last indexed record is damaged ({e}); rebuild this shard") from None
        if end != rec_size:
            raise UserError(f"{rec_path} has {rec_size - end} bytes after its last indexed record: the .idx does "
                             f"not match the .rec; rebuild this shard")
    elif rec_size:
        raise UserError(f"{idx_path} is empty but {os.path.basename(rec_path)} is not: rebuild this shard")
    _INDEX_CACHE[key] = offsets
    return offsets


def merged_index(rec_paths: list[str], cache_dir: str | None = None) -> tuple[list[str], str]:
    """One ``.idx`` covering several shards, for MXNet's ImageRecordIter.

    ImageRecordIter reads ``path_imgrec`` as the concatenation of ``;``-separated files but refuses more than one
    ``path_imgidx`` ("IndexedRecordIOSplitter does not support multiple index files", dmlc-core). Its index holds byte
    offsets into that concatenation, so one index with each shard's offsets shifted by the sizes of the shards before
    it serves them all. Returns the non-empty shards (dmlc-core refuses a zero-byte ``.rec`` on its own) and the
    merged index path, written once per shard set into ``cache_dir`` (default: a per-user folder in the temp dir).
    """
    used: list[str] = []
    lines: list[str] = []
    base = 0
    for rec in rec_paths:
        offsets = read_offsets(rec)
        if not offsets:
            continue
        used.append(os.path.abspath(rec))
        start = len(lines)
        lines.extend(f"{start + i}\t{base + off}\n" for i, off in enumerate(offsets))
        base += os.path.getsize(rec)
    if not used:
        raise UserError("the shards hold no records: " + ", ".join(os.path.basename(p) for p in rec_paths))
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), f"im2rec_tools-{os.getuid()}")
    os.makedirs(cache_dir, exist_ok=True)
    digest = hashlib.sha1(repr(_stat_key(*used, *map(idx_path_for, used))).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"merged-{digest}.idx")
    if os.path.isfile(path):
        os.utime(path)  # in use: keep it out of the pruning below
    else:
        # Atomic: processes of one distributed job may race to write the same file (the same content).
        atomic_write_text(path, "".join(lines))
        _prune(cache_dir, keep=path)
    return used, path


def _prune(cache_dir: str, keep: str, max_age_days: float = 30) -> None:
    """Delete merged indexes unused for ``max_age_days`` (every repack makes a new one)."""
    cutoff = time.time() - max_age_days * 86400
    for entry in os.scandir(cache_dir):
        if entry.name.startswith("merged-") and entry.path != keep:
            try:
                if entry.stat().st_mtime < cutoff:
                    os.remove(entry.path)
            except OSError:
                pass  # another process got there first


# ------------------------------------------------------------------------------------------------------ checksums
# RecordIO has no checksum (TFRecord has a CRC per record); ``pack`` writes one per record into a sidecar beside the
# ``.idx``. Hand-written: no MXNet tool writes or checks one. CRC-32 (zlib, stdlib) over each record's bytes in the
# ``.rec``, from its offset to the next record's.

CHECKSUM_HEADER = "# im2rec_tools record checksums v1: key<TAB>offset<TAB>bytes<TAB>crc32 of the record's bytes\n"


def checksum_path_for(rec_path: str) -> str:
    """``d/train-00000-of-00004.rec`` -> ``d/train-00000-of-00004.crc``."""
    return (rec_path[:-4] if rec_path.endswith(".rec") else rec_path) + ".crc"


def _index_entries(idx_path: str) -> list[tuple[str, int]]:
    entries = []
    with open(idx_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) == 2 and fields[1].isdigit():
                entries.append((fields[0], int(fields[1])))
    return sorted(entries, key=lambda e: e[1])


def record_spans(idx_path: str, rec_size: int) -> list[tuple[str, int, int]]:
    """(key, offset, bytes) of every indexed record, in file order: each runs to the next one (the last: the end)."""
    entries = _index_entries(idx_path)
    ends = [offset for _, offset in entries[1:]] + [rec_size]
    return [(key, offset, end - offset) for (key, offset), end in zip(entries, ends)]


def compute_checksums(rec_path: str, idx_path: str) -> str:
    """The sidecar's text for a shard (its ``.rec`` and ``.idx`` may still be under temporary names)."""
    lines = [CHECKSUM_HEADER]
    with open(rec_path, "rb") as f:
        for key, offset, size in record_spans(idx_path, os.path.getsize(rec_path)):
            f.seek(offset)
            lines.append(f"{key}\t{offset}\t{size}\t{zlib.crc32(f.read(size)):08x}\n")
    return "".join(lines)


def read_checksums(rec_path: str) -> dict[int, tuple[str, int, int]] | None:
    """{offset: (key, bytes, crc32)} from the shard's sidecar; None when it has none (packed by MXNet's im2rec.py)."""
    path = checksum_path_for(rec_path)
    if not os.path.isfile(path):
        return None
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        if f.readline() != CHECKSUM_HEADER:
            raise UserError(f"{path} is empty or not a checksum file of im2rec-tools pack (its first line is not "
                            f"the header): delete it, or repack the shard")
        for line_no, line in enumerate(f, 2):
            if not line.endswith("\n"):
                raise UserError(f"{path} ends inside line {line_no}: it was cut short; repack the shard or delete "
                                f"the checksum file")
            if line.startswith("#") or not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            try:
                key, offset, size, crc = fields[0], int(fields[1]), int(fields[2]), int(fields[3], 16)
            except (IndexError, ValueError):
                raise UserError(f"{path} line {line_no} is not 'key<TAB>offset<TAB>bytes<TAB>crc32': repack the "
                                f"shard or delete the checksum file") from None
            out[offset] = (key, size, crc)
    return out


def checksum_problems(rec_path: str, full: bool = True) -> list[tuple[str, str]] | None:
    """[(where, reason)] for every record whose bytes or place disagree with the sidecar; None without one.

    ``full=False`` compares only the record count and offsets (no reading of the ``.rec``).
    """
    try:
        sums = read_checksums(rec_path)
    except UserError as exc:  # a damaged sidecar is one problem, named like the others
        return [("checksum file", str(exc))]
    if sums is None:
        return None
    rec_size = os.path.getsize(rec_path)
    spans = record_spans(idx_path_for(rec_path), rec_size)
    problems = []
    if len(sums) != len(spans):
        problems.append(("checksum file", f"lists {len(sums)} records, the .idx {len(spans)}: they are not of the "
                                          f"same pack"))
    with open(rec_path, "rb") as f:
        for i, (key, offset, _span) in enumerate(spans):
            where = f"index {i} (key {key}, byte {offset})"  # as verify names a record
            if offset not in sums or sums[offset][0] != key:
                problems.append((where, "not in the checksum file at this offset: the .idx and the .crc are not of "
                                        "the same pack"))
                continue
            if offset + sums[offset][1] > rec_size:
                problems.append((where, f"cut off: the .rec ends at byte {rec_size}, the record needs "
                                        f"{sums[offset][1]} bytes from {offset} (a truncated copy)"))
                continue
            if not full:
                continue
            f.seek(offset)
            data = f.read(sums[offset][1])  # the packed record (a .idx cut short makes the last span run on)
            if zlib.crc32(data) != sums[offset][2]:
                problems.append((where, "checksum mismatch: its bytes changed since it was packed (corrupt data)"))
    return problems


def shard_fingerprint(rec_path: str) -> tuple[int, int]:
    """What every copy of a shard shares: its size and the CRC-32 of its records' checksums in order (from its
    ``.crc``), or without one the CRC-32 of its first and last MiB."""
    size = os.path.getsize(rec_path)
    sidecar = checksum_path_for(rec_path)
    if os.path.isfile(sidecar):
        with open(sidecar, "rb") as f:
            crcs = [line.rsplit(b"\t", 1)[-1] for line in f.read().splitlines()[1:]]
        return size, zlib.crc32(b"".join(crcs))
    with open(rec_path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(len(head), size - (1 << 20)))
        return size, zlib.crc32(head + f.read())


def duplicate_shards(rec_paths: list[str]) -> list[tuple[str, str]]:
    """(first, copy) for every shard holding the same records as an earlier one in ``rec_paths`` (empty ones aside).
    Only shards of equal size are read (a copy has its original's size; distinct shards almost never do)."""
    sizes: dict[int, int] = {}
    for path in rec_paths:
        sizes[os.path.getsize(path)] = sizes.get(os.path.getsize(path), 0) + 1
    first: dict[tuple[int, int], str] = {}
    copies = []
    for path in rec_paths:
        if os.path.getsize(path) == 0 or sizes[os.path.getsize(path)] < 2:
            continue
        key = shard_fingerprint(path)
        if key in first:
            copies.append((first[key], path))
        else:
            first[key] = path
    return copies
