"""``make-list``: image lists (MXNet ``.lst``) and the class table from a class-folder tree or a flat folder + CSV.

A ``.lst`` line is ``index<TAB>label<TAB>relative/path`` (MXNet's format, written with ``mxnet.tools.im2rec``'s
``write_list``). ``classes.txt`` lines are ``label<TAB>class name``. Labels follow the class names sorted by name
(numerically when every name is a whole number, so folders ``0``..``10`` keep their values). Index numbers are each
image's position in the sorted full listing, so train and val ids never collide and an id always finds its file.
"""
from __future__ import annotations

import csv
import io
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xception_mx.errors import UserError
from xception_mx.fileio import atomic_path, atomic_write_text, printable_path, read_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class ListEntry:
    """One ``.lst`` line."""
    index: int
    label: int
    path: str


def sort_class_names(names: Iterable[str]) -> list[str]:
    """Class names in label order: numeric when all are whole numbers, else by name."""
    names = sorted(set(names))
    return sorted(names, key=int) if names and all(n.isdigit() for n in names) else names


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_class_tree(root: str) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(class folder names, [(relative path, class name)], notes) for a tree with one sub-folder per class.

    Images may sit at any depth below their class folder; hidden files and folders are ignored.
    """
    notes = []
    classes = sort_class_names(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    loose = [e.name for e in os.scandir(root) if e.is_file() and is_image_name(e.name)]
    if not classes:
        if loose:
            raise UserError(f"{root} holds images but no class sub-folders: for a flat folder give "
                            f"--labels FILE.csv with 'relative_path,class_name' rows")
        raise UserError(f"{root} is empty: expected one sub-folder of images per class")
    if loose:
        notes.append(f"ignored {len(loose)} images directly in {root} (not inside a class folder)")
    items: list[tuple[str, str]] = []
    for name in classes:
        found = _walk_images(root, os.path.join(root, name))
        if not found:
            notes.append(f"class folder {name!r} has no images")
        items.extend((path, name) for path in found)
    if not items:
        raise UserError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}, any case) in the class folders "
                        f"of {root}")
    return classes, items, notes


def _walk_images(root: str, class_dir: str) -> list[str]:
    """Relative paths of the images below ``class_dir``, following links; one line for a link loop or a file name
    that is not UTF-8 (``os.walk`` would loop through a link cycle until the path length gives out)."""
    found, seen = [], {os.path.realpath(class_dir)}
    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        kept = []
        for d in dirs:
            if d.startswith("."):
                continue
            real = os.path.realpath(os.path.join(folder, d))
            if real in seen:
                raise UserError(f"{printable_path(os.path.join(folder, d))} leads to {printable_path(real)}, which "
                                f"the listing already reached (a symbolic link loop, or two links to one folder): "
                                f"remove the link")
            seen.add(real)
            kept.append(d)
        dirs[:] = kept
        for f in files:
            if is_image_name(f):
                path = os.path.join(folder, f)
                if printable_path(path) != path:
                    raise UserError(f"{printable_path(path)}: the file name is not UTF-8, so it cannot go into a "
                                    f".lst file; rename it (e.g. convmv -f latin1 -t utf-8)")
                found.append(os.path.relpath(path, root))
    return found


def outside_root(rel_path: str) -> bool:
    """A list path that leaves the image root (absolute, or climbing out with ``..``); read lexically, so
    symlinked class folders inside the root stay allowed."""
    norm = os.path.normpath(rel_path)
    return os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep)


def check_inside_root(paths: list[str], source: str, root: str) -> None:
    """One line for the first path of ``source`` that leaves ``root``."""
    outside = [p for p in paths if outside_root(p)]
    if outside:
        raise UserError(f"{source} lists {len(outside)} path(s) outside {root} (first: {outside[0]}): paths must be "
                        f"relative to the image root; pass --allow-outside-root if that is intended")


def read_labels_csv(root: str, csv_path: str, allow_outside: bool = False) -> list[tuple[str, str]]:
    """[(relative path, class name)] from ``relative_path,class_name`` rows; a header row is allowed."""
    if not os.path.isfile(csv_path):
        raise UserError(f"labels file {csv_path} does not exist")
    items: list[tuple[str, str]] = []
    seen: set[str] = set()
    text = read_text(csv_path, "labels file", encoding="utf-8-sig")
    for row_no, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f"{csv_path} row {row_no} is not 'relative_path,class_name': {','.join(row)[:80]!r}")
        path, name = os.path.normpath(row[0].strip()), row[1].strip()
        if not items and not is_image_name(os.path.basename(path)) \
                and not os.path.isfile(os.path.join(root, path)):
            continue  # header row
        if path in seen:
            raise UserError(f"{csv_path} row {row_no} lists {path} a second time")
        seen.add(path)
        items.append((path, name))
    if not items:
        raise UserError(f"labels file {csv_path} has no rows")
    if not allow_outside:
        check_inside_root([p for p, _ in items], csv_path, root)
    missing = [p for p, _ in items if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise UserError(f"{len(missing)} files listed in {csv_path} are not under {root} (first: {missing[0]}): "
                        f"check the image folder")
    return items


def read_classes(path: str) -> list[str]:
    """Class names in label order from a ``classes.txt`` (``label<TAB>name`` lines, labels 0..K-1)."""
    if not os.path.isfile(path):
        raise UserError(f"classes file {path} does not exist")
    names: list[str] = []
    for line_no, line in enumerate(read_text(path, "classes file").splitlines(keepends=True), 1):
        if not line.strip():
            continue
        label, _, name = line.rstrip("\n").partition("\t")
        if not label.strip().isdigit() or int(label) != len(names) or not name:
            raise UserError(f"{path} line {line_no} should be '{len(names)}<TAB>class name', got {line.strip()!r}")
        names.append(name)
    if not names:
        raise UserError(f"classes file {path} is empty")
    return names


def label_entries(items: Sequence[tuple[str, str]], class_names: Sequence[str], source: str) -> list[ListEntry]:
    """Entries with labels from ``class_names`` and indices by sorted path."""
    label_of = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({name for _, name in items if name not in label_of})
    if unknown:
        raise UserError(f"{len(unknown)} classes in {source} are not in the class table (first: {unknown[0]!r})")
    for path, _ in items:
        if "\t" in path or "\n" in path:
            raise UserError(f"{path!r}: a tab or newline in a file name cannot go into a .lst file; rename it")
    return [ListEntry(i, label_of[name], path) for i, (path, name) in enumerate(sorted(items))]


def split_stratified(entries: Sequence[ListEntry], val_ratio: float, seed: int
                     ) -> tuple[list[ListEntry], list[ListEntry]]:
    """(train, val): round(n * val_ratio) images of each class go to val, always leaving a class one train image.

    Deterministic for a seed. Train is shuffled (so consecutive shards and data-parallel parts mix classes);
    val is sorted by label, then path.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[ListEntry]] = {}
    for e in sorted(entries, key=lambda e: e.index):
        by_label.setdefault(e.label, []).append(e)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_val = min(int(math.floor(len(group) * val_ratio + 0.5)), len(group) - 1)
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    rng.shuffle(train)
    val.sort(key=lambda e: (e.label, e.path))
    return train, val


def write_lst(path: str, entries: Sequence[ListEntry]) -> None:
    """Write a ``.lst`` atomically (MXNet's ``im2rec.write_list`` into a temporary file, then rename)."""
    from mxnet.tools.im2rec import write_list

    with atomic_path(path) as tmp:
        write_list(tmp, [(e.index, e.path, e.label) for e in entries])


def write_classes(path: str, class_names: Sequence[str]) -> None:
    atomic_write_text(path, "".join(f"{i}\t{name}\n" for i, name in enumerate(class_names)))


def read_lst(path: str) -> list[ListEntry]:
    """Entries of a ``.lst`` file; UserError on the first malformed line.

    Hand-written: ``im2rec.read_list`` prints and skips malformed lines, which would silently drop images.
    """
    if not os.path.isfile(path):
        raise UserError(f"image list {path} does not exist (make one with `im2rec-tools make-list`)")
    entries, seen = [], set()
    for line_no, line in enumerate(read_text(path, "image list").splitlines(keepends=True), 1):
        if not line.strip():
            continue
        fields = [x.strip() for x in line.rstrip("\n").split("\t")]
        try:
            if len(fields) != 3:
                raise ValueError
            index, label, rel = int(fields[0]), float(fields[1]), fields[2]
            if not rel or not math.isfinite(label) or label < 0 or label != int(label):
                raise ValueError
        except ValueError:
            raise UserError(f"{path} line {line_no} is not 'index<TAB>class label<TAB>path' with a whole "
                            f"non-negative label: {line.strip()[:80]!r}") from None
        if index in seen:
            raise UserError(f"{path} line {line_no} repeats index {index}: indices must be unique")
        seen.add(index)
        entries.append(ListEntry(index, int(label), rel))
    if not entries:
        raise UserError(f"image list {path} is empty")
    return entries


def check_out_prefix(out_prefix: str) -> None:
    """UserError unless ``out_prefix`` ends in a file name part (``data/train``, not ``data/``)."""
    if not os.path.basename(out_prefix):
        raise UserError(f"OUT_PREFIX {out_prefix!r} ends with a folder separator: give a name prefix such as "
                        f"{os.path.join(out_prefix, 'train')}")


def list_outputs(out_prefix: str, val_ratio: float) -> dict[str, str]:
    """The files ``make-list`` writes for a prefix."""
    if val_ratio > 0:
        return {"train": f"{out_prefix}_train.lst", "val": f"{out_prefix}_val.lst",
                "classes": f"{out_prefix}_classes.txt"}
    return {"list": f"{out_prefix}.lst", "classes": f"{out_prefix}_classes.txt"}


def make_lists(image_root: str, out_prefix: str, val_ratio: float = 0.1, seed: int = 0,
               labels_csv: str | None = None, classes_file: str | None = None, allow_outside: bool = False
               ) -> tuple[dict[str, list], list[str]]:
    """Scan ``image_root`` and write the lists; returns ({output path: entries or class names}, notes)."""
    if not 0 <= val_ratio < 1:
        raise UserError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    check_out_prefix(out_prefix)
    if not os.path.isdir(image_root):
        raise UserError(f"image folder {image_root} does not exist")
    notes: list[str]
    if labels_csv:
        items, notes = read_labels_csv(image_root, labels_csv, allow_outside), []
        found_classes = sort_class_names(name for _, name in items)
        source = labels_csv
    else:
        found_classes, items, notes = scan_class_tree(image_root)
        source = image_root
    class_names = read_classes(classes_file) if classes_file else found_classes
    entries = label_entries(items, class_names, source)
    out_dir = os.path.dirname(out_prefix)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    outputs = list_outputs(out_prefix, val_ratio)
    train, val = split_stratified(entries, val_ratio, seed)
    written: dict[str, list] = {}
    if val_ratio > 0:
        write_lst(outputs["train"], train)
        write_lst(outputs["val"], val)
        written[outputs["train"]], written[outputs["val"]] = train, val
    else:
        write_lst(outputs["list"], train)
        written[outputs["list"]] = train
    write_classes(outputs["classes"], class_names)
    written[outputs["classes"]] = list(class_names)
    return written, notes
