"""A training run's folder: where each file goes, which checkpoints are complete, manifests, removal, pruning.

An epoch-E checkpoint of prefix P in the folder is ``P-symbol.json`` + ``P-EEEE.params`` (the MXNet export),
``P-EEEE.state.params`` (weights, optimizer and EMA arrays) and ``P-EEEE.state.json`` (the manifest, written last:
without it the checkpoint is incomplete and ignored). A mid-epoch checkpoint uses ``partial`` for ``EEEE`` and has
no export. Beside them: ``config.yaml`` (a human-readable copy of the manifest's config), ``P-preprocess.json``,
``metrics.jsonl``, ``best.json``, ``curves.png``, ``train.log``. Imports no MXNet.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

from .errors import UserError
from .fileio import atomic_write_text

__all__ = ["RunFolder", "CheckpointFiles", "numbered_files", "prefixes_in"]


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
    pattern = re.compile(r"^(.+)-(\d{4,}|partial)\.state\.json$")
    names = {m.group(1) for m in map(pattern.match, os.listdir(folder) if os.path.isdir(folder) else []) if m}
    return sorted(names)


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
    best = property(lambda self: self.path("best.json"))
    curves = property(lambda self: self.path("curves.png"))

    def files(self, epoch: int | None) -> CheckpointFiles:
        """Epoch ``epoch``'s checkpoint files; ``None`` names the mid-epoch checkpoint."""
        tag = "partial" if epoch is None else f"{epoch:04d}"
        base = self.model_prefix
        return CheckpointFiles(f"{base}-symbol.json", f"{base}-{tag}.params", f"{base}-{tag}.state.params",
                               f"{base}-{tag}.state.json")

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

    def manifest(self, epoch: int) -> dict:
        """Epoch ``epoch``'s manifest; one line naming the epochs that exist when it is missing or unreadable."""
        if epoch not in self.epochs():
            have = ", ".join(map(str, self.epochs())) or "none"
            raise UserError(f"no complete checkpoint for epoch {epoch} in {self.folder} (prefix {self.prefix!r}); "
                            f"epochs that exist: {have}")
        path = self.files(epoch).manifest
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); resume from another epoch") from None

    def partial_manifest(self) -> dict | None:
        """The mid-epoch checkpoint's manifest, or None when there is none (or it is incomplete)."""
        f = self.files(None)
        if not (os.path.isfile(f.manifest) and os.path.isfile(f.state)):
            return None
        try:
            with open(f.manifest, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def write_manifest(self, epoch: int | None, manifest: dict) -> None:
        atomic_write_text(self.files(epoch).manifest, json.dumps(manifest, indent=1, sort_keys=True))

    def remove(self, epoch: int | None) -> None:
        """Delete a checkpoint (the manifest first: a crash midway leaves nothing that looks complete)."""
        f = self.files(epoch)
        for path in (f.manifest, f.state, f.export):
            if os.path.exists(path):
                os.remove(path)

    def prune(self, epoch: int, keep_last: int, best_epoch: int | None) -> None:
        """Keep only the last ``keep_last`` epochs (0 = all), and always the best one."""
        if not keep_last:
            return
        for old in self.epochs():
            if old <= epoch - keep_last and old != best_epoch:
                self.remove(old)
