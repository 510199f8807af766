"""A training run's folder: where each file goes, which checkpoints are complete, manifests, removal, pruning.

An epoch-E checkpoint of prefix P in the folder is ``P-symbol.json`` + ``P-EEEE.params`` (the MXNet export),
``P-EEEE.state.params`` (weights, optimizer and EMA arrays) and ``P-EEEE.state.json`` (the manifest, written last:
without it the checkpoint is incomplete and ignored). A mid-epoch checkpoint (a signal's or a recovery one) is
``P-partial.state.json`` naming its own state file ``P-partial.<token>.state.params``, so a manifest is never paired
with another checkpoint's arrays; every manifest records its state file's size and CRC-32. Beside them:
``config.yaml`` (a human-readable copy of the manifest's config), ``P-preprocess.json``, ``metrics.jsonl``,
``best.json``, ``curves.png``, ``classes.txt`` (the training data's class names, when it has them), ``train.log``,
``.lock`` (held by the trainer). Imports no MXNet.

:func:`resolve_export` is the one place that turns ``--checkpoint`` or ``--model-prefix`` + ``--epoch best|last|N``
into the export a command loads.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

from .console import command_line, did_you_mean
from .errors import UserError
from .fileio import atomic_write_text
from .manifest import Manifest
from .metrics import read_jsonl
from .records import read_classes

__all__ = ["RunFolder", "RunLock", "CheckpointFiles", "numbered_files", "prefixes_in", "beside", "resolve_export",
           "classes_file", "classes_target", "write_classes", "CLASSES_FILE", "BEST_FILE"]

#: The class names (``label<TAB>name`` lines, ``im2rec-tools make-list``) beside the shards, and in a run folder.
CLASSES_FILE = "classes.txt"
#: The best epoch's figures (``manifest.EpochRecord``), rewritten at every epoch's end.
BEST_FILE = "best.json"


@dataclass(frozen=True)
class CheckpointFiles:
    symbol: str
    export: str
    state: str
    manifest: str


def numbered_files(prefix_path: str, suffix: str) -> list[int]:
    """The N of every ``PREFIX-NNNN<suffix>`` file (4 or more digits), ascending."""
    base = os.path.basename(prefix_path)
    pattern = re.compile(re.escape(base) + r"-(\d{4,})" + re.escape(suffix) + "$")
    found = []
    for path in glob.glob(glob.escape(prefix_path) + "-*" + suffix):
        match = pattern.match(os.path.basename(path))
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def prefixes_in(folder: str) -> list[str]:
    """Checkpoint prefixes that have a manifest (complete or mid-epoch) in ``folder``."""
    pattern = re.compile(r"^([^.].*)-(\d{4,}|partial)\.state\.json$")
    names = {m.group(1) for m in map(pattern.match, os.listdir(folder) if os.path.isdir(folder) else []) if m}
    return sorted(names)


def beside(prefix: str, name: str) -> str:
    """The file ``name`` in the folder of the files ``prefix`` names."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), name)


def classes_file(prefix: str, classes: str | None) -> str | None:
    """The class names of the export ``prefix``: ``classes`` (``--classes``) when given, else the classes.txt beside
    it when there is one (the trainer copies the training data's into its run folder)."""
    path = classes or beside(prefix, CLASSES_FILE)
    return path if classes or os.path.isfile(path) else None


def classes_target(names: list[str], out: str, source: str) -> str | None:
    """Where ``names`` (read from ``source``) go beside the output ``out``: None when the classes.txt there already
    names them; one naming other classes is one line (it is left alone)."""
    target = beside(out, CLASSES_FILE)
    if not os.path.exists(target):
        return target
    if read_classes(target) != names:
        raise UserError(f"{target} names other classes than {source}: write into another folder")
    return None


def write_classes(path: str | None, names: list[str] | None) -> None:
    """A classes.txt (``label<TAB>name`` lines, as ``im2rec-tools make-list`` writes), atomically; nothing when
    ``path`` (``classes_target``'s answer) or ``names`` is None."""
    if path and names:
        atomic_write_text(path, "".join(f"{label}\t{name}\n" for label, name in enumerate(names)))


_EXPORT_PARAMS = re.compile(r"^(.+)-(\d{4,})\.params$")


def resolve_export(prefix: str | None, epoch: str | None, checkpoint: str | None) -> tuple[str, int]:
    """(PREFIX, epoch) of the export a command loads: ``checkpoint`` (a ``PREFIX-NNNN.params`` path), else ``prefix``
    at ``epoch``: ``best`` (the run folder's ``best.json``), ``last`` (the highest ``PREFIX-NNNN.params`` present)
    or a number. Bad or missing input is one line saying what to give instead."""
    if checkpoint:
        if prefix or epoch is not None:
            raise UserError("give either --checkpoint PREFIX-NNNN.params or --model-prefix with --epoch, not both")
        return _split_checkpoint(checkpoint)
    if not prefix:
        raise UserError("give --model-prefix PREFIX with --epoch best|last|N, or --checkpoint PREFIX-NNNN.params")
    if epoch is None:
        raise UserError(f"--model-prefix {prefix} needs --epoch: best, last or a number")
    if epoch == "best":
        return prefix, _best_epoch(prefix)
    if epoch == "last":
        epochs = numbered_files(prefix, ".params")
        if not epochs:
            raise UserError(f"--epoch last: no {prefix}-NNNN.params exists: check --model-prefix (the files' name "
                            f"without -NNNN.params) or train first")
        return prefix, epochs[-1]
    if not epoch.isdigit():
        hint = did_you_mean([epoch], ["best", "last"])
        raise UserError(f"--epoch must be best, last or a number, got {epoch!r}{hint}")
    return prefix, int(epoch)


def _split_checkpoint(path: str) -> tuple[str, int]:
    match = _EXPORT_PARAMS.match(path)
    if path.endswith(".state.params") or not match:
        raise UserError(f"--checkpoint {path}: give an export's PREFIX-NNNN.params (what the trainer and "
                        f"xception-deploy write beside PREFIX-symbol.json), not a state file")
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path} does not exist")
    return match.group(1), int(match.group(2))


def _best_epoch(prefix: str, flag: str = "--epoch") -> int:
    """The epoch ``best.json`` beside ``prefix`` names (the trainer writes it at every epoch's end); ``flag``: the
    option that asked, for the error lines."""
    path, instead = beside(prefix, BEST_FILE), f"give {flag} last or a number"
    try:
        with open(path, encoding="utf-8") as fh:
            epoch = json.load(fh).get("epoch")
    except FileNotFoundError:
        raise UserError(f"{flag} best: no best.json in {os.path.dirname(path)} (the trainer writes it in its run "
                        f"folder): {instead}") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{flag} best: {path} is unreadable ({exc}): {instead}") from None
    if not isinstance(epoch, int):
        raise UserError(f"{flag} best: {path} names no epoch yet: {instead}")
    return epoch


class RunFolder:
    """The files of one run (``folder``) whose checkpoints are named ``prefix``."""

    def __init__(self, folder: str, prefix: str):
        self.folder, self.prefix = folder, prefix

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    @property
    def model_prefix(self) -> str:
        """What ``score.py --model-prefix`` takes for this run's exports."""
        return self.path(self.prefix)

    config_yaml = property(lambda self: self.path("config.yaml"))
    metrics = property(lambda self: self.path("metrics.jsonl"))
    best = property(lambda self: self.path(BEST_FILE))
    classes = property(lambda self: self.path(CLASSES_FILE))
    curves = property(lambda self: self.path("curves.png"))

    def files(self, epoch: int | None, token: str | None = None) -> CheckpointFiles:
        """Epoch ``epoch``'s checkpoint files; ``None`` names the mid-epoch checkpoint (its state file carries the
        ``token`` its manifest records; without one, the name of checkpoints written before tokens existed)."""
        tag = "partial" if epoch is None else f"{epoch:04d}"
        base = self.model_prefix
        state = f"{base}-partial.{token}.state.params" if epoch is None and token else f"{base}-{tag}.state.params"
        return CheckpointFiles(f"{base}-symbol.json", f"{base}-{tag}.params", state, f"{base}-{tag}.state.json")

    def state_file(self, epoch: int | None, manifest: Manifest) -> str:
        """The state file a manifest belongs to."""
        return self.files(epoch, manifest.files.token).state

    def _state_matches(self, epoch: int | None, manifest: Manifest) -> bool:
        """The manifest's own state file is there, with the size it recorded (the CRC is checked on load)."""
        path, size = self.state_file(epoch, manifest), manifest.files.size
        return os.path.isfile(path) and (size is None or os.path.getsize(path) == size)

    def epochs(self) -> list[int]:
        """Epochs with a complete checkpoint (manifest and the files it needs), ascending."""
        out = []
        for epoch in numbered_files(self.model_prefix, ".state.json"):
            f = self.files(epoch)
            if all(os.path.isfile(p) for p in (f.state, f.export, f.symbol)):
                out.append(epoch)
        return out

    def latest(self) -> int | None:
        epochs = self.epochs()
        return epochs[-1] if epochs else None

    def named_epoch(self, name: str, flag: str) -> int:
        """``best`` (``best.json``) or ``last`` (the newest complete checkpoint) as an epoch number."""
        if name == "best":
            return _best_epoch(self.path(self.prefix), flag)
        latest = self.latest()
        if latest is None:
            raise UserError(f"{flag} last: {self.folder} holds no complete checkpoint (prefix {self.prefix!r})")
        return latest

    def manifest(self, epoch: int) -> Manifest:
        """Epoch ``epoch``'s manifest; one line naming the epochs that exist when it is missing or unreadable."""
        if epoch not in self.epochs():
            have = ", ".join(map(str, self.epochs())) or "none"
            raise UserError(f"no complete checkpoint for epoch {epoch} in {self.folder} (prefix {self.prefix!r}); "
                            f"epochs that exist: {have}")
        path = self.files(epoch).manifest
        try:
            return _read_manifest(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path} is unreadable ({exc!r}); resume from another epoch") from None

    def partial_manifest(self) -> Manifest | None:
        """The mid-epoch checkpoint's manifest, or None when there is none (or its own state file is missing)."""
        try:
            manifest = _read_manifest(self.files(None).manifest)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return manifest if manifest.in_progress and self._state_matches(None, manifest) else None

    def partial_state_files(self) -> list[str]:
        return sorted(glob.glob(glob.escape(self.model_prefix) + "-partial*.state.params"))

    def write_manifest(self, epoch: int | None, manifest: Manifest) -> None:
        atomic_write_text(self.files(epoch).manifest, json.dumps(manifest.to_json(), indent=1, sort_keys=True))

    def remove(self, epoch: int | None) -> None:
        """Delete a checkpoint (the manifest first: a crash midway leaves nothing that looks complete)."""
        f = self.files(epoch)
        states = self.partial_state_files() if epoch is None else [f.state]
        softmax = [f"{self.model_prefix}-softmax-{epoch:04d}.params"] if epoch is not None else []
        for path in (f.manifest, *states, f.export, *softmax):
            if os.path.exists(path):
                os.remove(path)

    def drop_partial_states(self, keep: str) -> None:
        """Mid-epoch state files other than ``keep`` (the one the current manifest names)."""
        for path in self.partial_state_files():
            if path != keep:
                os.remove(path)

    def branch_after(self, epoch: int) -> str | None:
        """A retrain from ``epoch``: move the later checkpoints (and the mid-epoch one) and their metrics lines into
        ``before-retrain-from-EEEE-<time>/``, so no ``--resume`` can continue the branch it left. Returns the folder,
        or None when there was nothing to move."""
        later = [e for e in numbered_files(self.model_prefix, ".state.json") if e > epoch]
        partial = os.path.isfile(self.files(None).manifest) or bool(self.partial_state_files())
        records = read_jsonl(self.metrics)
        moved_records = [r for r in records if r.get("epoch", 0) > epoch]
        if not (later or partial or moved_records):
            return None
        dest = self.path(f"before-retrain-from-{epoch:04d}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(dest, exist_ok=True)
        for tag in [*later, None]:
            f = self.files(tag)
            states = self.partial_state_files() if tag is None else [f.state]
            for path in (f.manifest, *states, f.export):  # the manifest first, as in remove()
                if os.path.exists(path):
                    os.replace(path, os.path.join(dest, os.path.basename(path)))
        for shared in (self.files(None).symbol, self.config_yaml, self.classes):  # a loadable run folder
            if os.path.isfile(shared):
                shutil.copy2(shared, dest)
        if moved_records:
            atomic_write_text(os.path.join(dest, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in moved_records))
            atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in records if r not in moved_records))
        return dest

    def refuse_fresh_run(self) -> None:
        """A fresh run never writes into a folder that holds a run: its checkpoints (any prefix) or its metrics."""
        existing = self.epochs()
        if existing or self.partial_manifest() is not None:
            have = f"epochs {existing[0]}..{existing[-1]}" if existing else "a mid-epoch checkpoint"
            raise UserError(f"{self.folder} already holds checkpoints ({have}): pass --resume to continue, "
                            f"or choose another --output-dir")
        other = self.holds_a_run()
        if other:
            raise UserError(f"{self.folder} already holds another run ({', '.join(other)}): resume it with --resume "
                            f"(and its --prefix), or choose another --output-dir")

    def resume_hint(self) -> str:
        """Where a resume of this folder would continue, as the command to run."""
        partial, latest = self.partial_manifest(), self.latest()
        if partial and partial.in_progress:
            where = f"epoch {partial.epoch + 1}, batch {partial.in_progress.batches_done}"
        elif latest:
            where = f"the end of epoch {latest}"
        else:
            return "no checkpoint was complete yet: start the run again (a fresh start may use this folder)"
        return f"resume from {where} with: {self.resume_command()}"

    def resume_command(self, *more: object) -> str:
        """``train_xception.py --output-dir FOLDER --resume`` (and ``--prefix`` where the folder holds several),
        quoted for a shell."""
        prefix = ("--prefix", self.prefix) if len(prefixes_in(self.folder)) > 1 else ()
        return command_line("train_xception.py", "--output-dir", self.folder, "--resume", *prefix, *more)

    def holds_a_run(self) -> list[str]:
        """What in the folder belongs to a run (checkpoints of any prefix, metrics): empty for a fresh folder."""
        found = [f"checkpoints of prefix {p!r}" for p in prefixes_in(self.folder)]
        if os.path.isfile(self.metrics) and os.path.getsize(self.metrics):
            found.append("metrics.jsonl")
        return found

    def lock(self) -> RunLock:
        return RunLock(self.path(".lock"))

    def prune(self, epoch: int, keep_last: int, best_epoch: int | None) -> None:
        """Keep only the last ``keep_last`` epochs (0 = all), and always the best one."""
        if not keep_last:
            return
        for old in self.epochs():
            if old <= epoch - keep_last and old != best_epoch:
                self.remove(old)


class RunLock:
    """An exclusive ``flock`` on the run folder's ``.lock`` (the kernel releases it when the process dies).

    The holder's pid is written into the file, so a second trainer can say who holds the folder.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{os.path.dirname(self.path)} is in use by another training run (pid {holder}): "
                            f"wait for it to finish, or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_manifest(path: str) -> Manifest:
    with open(path, encoding="utf-8") as fh:
        return Manifest.from_json(json.load(fh))
