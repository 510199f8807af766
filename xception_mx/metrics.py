"""Metrics: classification counts, the per-epoch JSON-lines log, and its plot.

    python -m xception_mx.metrics runs/demo/metrics.jsonl runs/demo/curves.png
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .console import run_cli
from .errors import UserError
from .fileio import atomic_path, atomic_write_text

__all__ = ["Accumulator", "read_jsonl", "truncate_jsonl", "plot_curves", "loss_axis", "topk_correct"]


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows have their label among the k largest logits."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((top == labels.reshape(-1, 1)).any(axis=1).sum())


@dataclass
class Accumulator:
    """Sums of loss and correct counts over images (padding excluded by the caller)."""

    count: int = 0
    loss_sum: float = 0.0
    correct: dict = field(default_factory=lambda: {1: 0, 5: 0})

    def update(self, logits: np.ndarray, labels: np.ndarray, losses: np.ndarray) -> None:
        self.count += len(labels)
        self.loss_sum += float(np.sum(losses, dtype=np.float64))
        for k in self.correct:
            self.correct[k] += topk_correct(logits, labels, k)

    def top(self, k: int) -> float:
        return self.correct[k] / self.count if self.count else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    def to_dict(self) -> dict:
        return {"count": self.count, "loss_sum": self.loss_sum, "correct": {str(k): v for k, v in self.correct.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Accumulator:
        return cls(d["count"], d["loss_sum"], {int(k): v for k, v in d["correct"].items()})


def resident_mib() -> float | None:
    """This process's resident memory in MiB (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a crash mid-write
    return records


def truncate_jsonl(path: str, last_epoch: int) -> None:
    """Keep only the epochs <= last_epoch (a resume rewrites what comes after)."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_jsonl(path) if r.get("epoch", 0) <= last_epoch]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


#: A loss more than this many decades above the upper quartile (or 1.5 interquartile ranges, in log10, when wider)
#: is drawn off scale: an early outlier (a diverged first epoch's val loss) would flatten every other point.
OFF_SCALE_DECADES = 1.0


def loss_axis(points: list[tuple[str, float]]) -> tuple[tuple[float, float] | None, list[str]]:
    """Log-scale y-limits for ``points`` ((label, loss) pairs, e.g. ("epoch-1 val loss", 121.3)) that leave out
    upper outliers (Tukey's fence on log10, at least :data:`OFF_SCALE_DECADES` above the upper quartile), and a note
    per point left out (``epoch-1 val loss 121 off scale``). No limits when no loss is positive and finite."""
    finite = [(label, v) for label, v in points if v is not None and np.isfinite(v) and v > 0]
    notes = [f"{label} {v:.3g} off scale" for label, v in points if v is not None and np.isinf(v) and v > 0]
    if not finite:
        return None, notes
    logs = np.log10([v for _, v in finite])
    q1, q3 = np.percentile(logs, [25, 75])
    fence = q3 + max(1.5 * (q3 - q1), OFF_SCALE_DECADES)
    notes += [f"{label} {v:.3g} off scale" for (label, v), lv in zip(finite, logs) if lv > fence]
    kept = logs[logs <= fence]
    margin = 0.05 * max(float(kept.max() - kept.min()), 0.2)
    return (10 ** (kept.min() - margin), 10 ** (kept.max() + margin)), notes


def plot_curves(jsonl_path: str, png_path: str) -> None:
    """Loss and accuracy per epoch (train against validation) and the lr at each logged step, written atomically to
    a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl_path)
    if not records:
        return
    epochs = [r["epoch"] for r in records]

    def series(key):
        return [np.nan if r.get(key) is None else r[key] for r in records]

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.8))
    _plot_loss(ax_loss, epochs, series("train_loss"), series("val_loss"))
    ax_acc.plot(epochs, series("train_top1"), "o-", label="train top-1")
    ax_acc.plot(epochs, series("val_top1"), "s-", label="val top-1")
    ax_acc.plot(epochs, series("val_top5"), "^--", label="val top-5")
    ax_acc.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    _plot_lr(ax_lr, records, epochs, series("lr"))
    for ax in (ax_loss, ax_acc):
        ax.legend()
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _plot_loss(ax, epochs: list[int], train: list[float], val: list[float]) -> None:
    """Train and val loss on a log axis whose limits leave out early outliers (:func:`loss_axis`), noted on it."""
    ax.plot(epochs, train, "o-", label="train")
    ax.plot(epochs, val, "s-", label="val")
    ax.set(title="loss", xlabel="epoch", yscale="log")
    points = [(f"epoch-{e} {kind} loss", v) for kind, values in (("train", train), ("val", val))
              for e, v in zip(epochs, values)]
    limits, notes = loss_axis(points)
    if limits is not None:
        ax.set_ylim(*limits)
    if notes:
        ax.text(0.02, 0.02, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="bottom", color="0.3")


def _plot_lr(ax, records: list[dict], epochs: list[int], first: list[float]) -> None:
    """The lr at each logged step (``lr_steps``) against the optimizer update, epochs' ends dotted; lines written
    before steps were recorded: the epoch's first lr."""
    steps = [step for r in records for step in r.get("lr_steps") or ()]
    if not steps:
        ax.plot(epochs, first, "o-")
        ax.set(title="lr (first step of the epoch)", xlabel="epoch")
        return
    for r in records:
        if r.get("lr_steps"):
            ax.axvline(r["lr_steps"][-1][0], color="0.6", lw=0.8, ls=":")
    updates, lrs = zip(*steps)
    ax.plot(updates, lrs, ".-", ms=3)
    ax.set(title="lr (each logged step; epochs' ends dotted)", xlabel="optimizer update")


def main(argv: list[str] | None = None) -> int:
    """``python -m xception_mx.metrics METRICS.jsonl OUT.png``: redraw a run's curves."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        if argv[:1] in (["-h"], ["--help"]):
            print("usage: python -m xception_mx.metrics METRICS.jsonl OUT.png\n\nRedraw a run's curves.png from its "
                  "metrics.jsonl.")
            return 0
        if len(argv) != 2:
            raise UserError("usage: python -m xception_mx.metrics METRICS.jsonl OUT.png")
        if not os.path.exists(argv[0]):
            raise UserError(f"{argv[0]} not found: give a run's metrics.jsonl")
        plot_curves(argv[0], argv[1])
        print(f"wrote {argv[1]}")
        return 0

    return run_cli("xception_mx.metrics", body)


if __name__ == "__main__":
    raise SystemExit(main())
