"""``pack``: an image list into ``PREFIX-0000i-of-0000N.rec`` / ``.idx`` shards, resumably.

Images are spread evenly over the shards in list order (shard ``s`` gets entries ``s*n//N`` .. ``(s+1)*n//N - 1``),
decoded and re-encoded on worker processes (``mx.recordio.pack`` then writes each record; the per-image work is
hand-written in ``images.py`` because ``mxnet.tools.im2rec.image_encode`` neither reports why a file failed nor
handles alpha or 16-bit inputs). A shard is written under temporary names, fsynced and renamed: ``.rec`` first, then
``.crc`` (a CRC-32 per record, which ``verify`` checks), the ``.idx`` last, so a shard whose ``.rec`` and ``.idx``
both exist is complete: a rerun after an interruption builds only the others. Unreadable files are skipped (never
half-written) and listed in ``PREFIX-skipped.txt``.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from xception_mx.errors import UserError
from xception_mx.fileio import atomic_paths, atomic_write_text, write_errors

from .images import ImageDecodeError, prepare_jpeg
from .listing import ListEntry, check_inside_root, check_out_prefix, read_lst
from .shards import checksum_path_for, compute_checksums, idx_path_for, shard_path

SKIPPED_HEADER = "# shard\tindex\tpath\treason\n"


@dataclass
class ShardOutcome:
    """What happened to one shard."""
    rec_path: str
    records: int
    built: bool  # False: already complete, left alone
    skipped: list[tuple[int, int, str, str]] = field(default_factory=list)  # (shard, index, path, reason)


@dataclass
class PackResult:
    shards: list[ShardOutcome]
    skipped_file: str | None

    @property
    def skipped(self) -> list[tuple[int, int, str, str]]:
        return [s for shard in self.shards for s in shard.skipped]


def _encode_task(task: tuple[int, str, int, int]) -> tuple[int, bytes | None, str]:
    index, path, shorter_side, quality = task
    try:
        return index, prepare_jpeg(path, shorter_side, quality), ""
    except ImageDecodeError as e:
        return index, None, str(e)


def _worker_init() -> None:
    from .images import cv2

    cv2.setNumThreads(1)  # parallelism comes from the processes


def shard_ranges(n_items: int, n_shards: int) -> list[range]:
    """Contiguous, near-equal (sizes differ by at most 1) ranges of list positions, one per shard."""
    return [range(s * n_items // n_shards, (s + 1) * n_items // n_shards) for s in range(n_shards)]


def is_complete(rec_path: str) -> bool:
    return os.path.isfile(rec_path) and os.path.isfile(idx_path_for(rec_path))


def _write_shard(rec_path: str, shard: int, entries: Sequence[ListEntry],
                 results: Iterator[tuple[int, bytes | None, str]], progress) -> ShardOutcome:
    import mxnet as mx

    idx_path = idx_path_for(rec_path)
    if os.path.exists(idx_path):
        os.remove(idx_path)  # the .idx marks a complete shard: drop it before the .rec is replaced
    outcome = ShardOutcome(rec_path, 0, True)
    # Renamed .rec first, then the checksums, then the .idx (whose presence marks a complete shard).
    with write_errors(os.path.dirname(os.path.abspath(rec_path)), f"shard {os.path.basename(rec_path)}",
                      "free space and run the same pack again (complete shards are kept)"), \
            atomic_paths(rec_path, checksum_path_for(rec_path), idx_path) as (tmp_rec, tmp_crc, tmp_idx):
        writer = mx.recordio.MXIndexedRecordIO(tmp_idx, tmp_rec, "w")
        try:
            for entry, (index, jpeg, reason) in zip(entries, results):
                assert index == entry.index
                if jpeg is None:
                    outcome.skipped.append((shard, entry.index, entry.path, reason))
                else:
                    header = mx.recordio.IRHeader(0, float(entry.label), entry.index, 0)
                    writer.write_idx(entry.index, mx.recordio.pack(header, jpeg))
                    outcome.records += 1
                progress.update(1)
        finally:
            writer.close()
        with open(tmp_crc, "w", encoding="utf-8") as f:
            f.write(compute_checksums(tmp_rec, tmp_idx))
    return outcome


def _count_records(rec_path: str) -> int:
    with open(idx_path_for(rec_path), encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.strip())


def _previous_skips(path: str, kept: set[int]) -> list[tuple[int, int, str, str]]:
    """Entries of an earlier ``-skipped.txt`` that belong to shards left alone this time."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if line.startswith("#") or len(fields) != 4 or not fields[0].isdigit() or int(fields[0]) not in kept:
                continue
            rows.append((int(fields[0]), int(fields[1]), fields[2], fields[3]))
    return rows


def _write_skipped(path: str, rows: list[tuple[int, int, str, str]]) -> str | None:
    if not rows:
        if os.path.isfile(path):
            os.remove(path)
        return None
    atomic_write_text(path, SKIPPED_HEADER + "".join(f"{s}\t{i}\t{p}\t{r}\n" for s, i, p, r in sorted(rows)))
    return path


def pack(lst_path: str, out_prefix: str, image_root: str, shards: int = 1, resize: int = 0, quality: int = 95,
         workers: int = 1, overwrite: bool = False, progress: bool = True, allow_outside: bool = False) -> PackResult:
    """Pack the images of ``lst_path`` (paths relative to ``image_root``) into ``shards`` RecordIO shards."""
    from tqdm import tqdm

    if shards < 1 or workers < 1 or resize < 0 or not 1 <= quality <= 100:
        raise UserError("need --shards >= 1, --workers >= 1, --resize >= 0 and --quality in 1..100")
    if not os.path.isdir(image_root):
        raise UserError(f"image folder {image_root} does not exist (--image-root)")
    check_out_prefix(out_prefix)
    entries = read_lst(lst_path)
    if not allow_outside:
        check_inside_root([e.path for e in entries], lst_path, image_root)
    if shards > len(entries):
        raise UserError(f"--shards {shards} is more than the {len(entries)} images in {lst_path}")
    paths = [os.path.join(image_root, e.path) for e in entries]
    if not any(os.path.isfile(p) for p in paths):
        raise UserError(f"none of the {len(entries)} files in {lst_path} exist under {image_root}: "
                        f"wrong --image-root?")
    out_dir = os.path.dirname(out_prefix)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    ranges = shard_ranges(len(entries), shards)
    rec_paths = [shard_path(out_prefix, s, shards) for s in range(shards)]
    todo = [s for s in range(shards) if overwrite or not is_complete(rec_paths[s])]
    outcomes: dict[int, ShardOutcome] = {s: ShardOutcome(rec_paths[s], _count_records(rec_paths[s]), False)
                                         for s in range(shards) if s not in todo}
    kept = set(outcomes)
    skipped_path = f"{out_prefix}-skipped.txt"
    for row in _previous_skips(skipped_path, kept):
        outcomes[row[0]].skipped.append(row)
    skipped_file = _write_skipped(skipped_path, [r for o in outcomes.values() for r in o.skipped])
    pool = None
    if workers > 1 and todo:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers, initializer=_worker_init)
    try:
        with tqdm(total=sum(len(ranges[s]) for s in todo), unit="img", desc=f"pack {os.path.basename(out_prefix)}",
                  disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
            for s in todo:
                shard_entries = [entries[i] for i in ranges[s]]
                tasks = [(e.index, paths[i], resize, quality) for i, e in zip(ranges[s], shard_entries)]
                results = pool.imap(_encode_task, tasks, chunksize=8) if pool else map(_encode_task, tasks)
                outcomes[s] = _write_shard(rec_paths[s], s, shard_entries, results, bar)
                # rewritten after every shard, so an interrupted run still lists the skips of the finished shards
                skipped_file = _write_skipped(skipped_path, [r for o in outcomes.values() for r in o.skipped])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return PackResult([outcomes[s] for s in range(shards)], skipped_file)
