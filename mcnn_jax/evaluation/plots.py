"""``mcnn-report DIR``: PNG plots of a run from its metrics.jsonl.

Writes into DIR/report (or --out): ``curves_by_step.png`` and ``curves_by_time.png`` (loss and accuracy,
train and validation), ``learning_rate.png``, and ``confusion.png`` (the last evaluation, with class names).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_metrics(workdir) -> tuple[list[dict], list[dict]]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics in {workdir} (expected {path}); is it a mcnn-train work directory?")
    train, val = [], []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a line cut short by a killed run
            raise ValueError(f"{path}, line {n}: not JSON")
        (train if rec.get("split") == "train" else val).append(rec)
    if not train and not val:
        raise ValueError(f"{path} holds no metrics yet")
    return train, val


def make_report(workdir, out=None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(workdir)
    out = Path(out) if out else Path(workdir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for xkey, xlabel, name in (("step", "step", "curves_by_step.png"), ("wall", "wall time (s)", "curves_by_time.png")):
        fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
        for recs, label, style in ((train, "train", "-"), (val, "validation", "o-")):
            recs = [r for r in recs if xkey in r]
            if recs:
                x = [r[xkey] for r in recs]
                ax_l.plot(x, [r["loss"] for r in recs], style, label=label, ms=3)
                ax_a.plot(x, [r["accuracy"] for r in recs], style, label=label, ms=3)
        for ax, ylabel in ((ax_l, "loss"), (ax_a, "accuracy")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        ax_a.set_ylim(0, 1.02)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    lr = [r for r in train if "lr" in r]
    if lr:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in lr], [r["lr"] for r in lr])
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "learning_rate.png", dpi=110)
        plt.close(fig)
        written.append(out / "learning_rate.png")
    evals = [r for r in val if "confusion" in r]
    if evals:
        last = evals[-1]
        cm = np.asarray(last["confusion"])
        names = last.get("class_names") or [str(i) for i in range(len(cm))]
        fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(names) + 2, 1.0 + 0.55 * len(names)))
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(names)):
            for j in range(len(names)):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"step {last['step']}: accuracy {last['accuracy']:.3f}")
        fig.tight_layout()
        fig.savefig(out / "confusion.png", dpi=110)
        plt.close(fig)
        written.append(out / "confusion.png")
    return written
