"""What a user sees of a run: a progress bar on a terminal (plain log lines otherwise), metrics as JSON lines
in ``<workdir>/metrics.jsonl``, and TensorBoard event files in ``<workdir>/tensorboard`` (tensorboardX)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def _plain(v):
    if isinstance(v, (np.ndarray, list, tuple)):
        return np.asarray(v).tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


class MetricsLog:
    """Appends one JSON object per record to metrics.jsonl and mirrors the scalars to TensorBoard."""

    def __init__(self, workdir, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, split: str, step: int, **values):
        if not self.enabled:
            return
        record = {"split": split, "step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k not in ("split", "step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self):
        if self.enabled:
            self._file.close()
            self._tb.close()


class Progress:
    """A tqdm bar (steps, images/s, loss, ETA) on an interactive terminal, plain log lines otherwise."""

    def __init__(self, total: int, initial: int, mode: str = "auto", every: int = 10, enabled: bool = True):
        self.enabled, self.every, self.total = enabled, max(1, every), total
        self.bar = None
        if enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty())):
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._t0, self._s0 = time.perf_counter(), initial

    def update(self, step: int, images_per_s: float, **shown):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({"img/s": f"{images_per_s:.2f}", **{k: f"{v:.4g}" for k, v in shown.items()}},
                                 refresh=False)
        elif step % self.every == 0 or step == self.total:
            done = step - self._s0
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - step) if done else float("nan")
            parts = " | ".join(f"{k} {v:.4g}" for k, v in shown.items())
            self.log(f"step {step}/{self.total} | {parts} | {images_per_s:.2f} img/s | eta {_duration(eta)}")

    def log(self, message: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
