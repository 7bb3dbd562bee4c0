"""What a user sees of a run: a progress bar on a terminal (plain log lines otherwise), metrics as JSON lines
in ``<workdir>/metrics.jsonl``, and TensorBoard event files in ``<workdir>/tensorboard`` (tensorboardX)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import logging


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
    """Progress of a long loop (training steps, images imported): a tqdm bar on an interactive terminal, else a
    plain line through ``absl.logging`` every ``every`` units (0: at every tenth of the total) and at the end.

    ``update(n, **shown)`` advances by ``n``; ``set(position, **shown)`` moves to a position; ``shown`` values
    (loss, img/s, ...) are printed with the bar or line.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        desc: str = "",
        unit: str = "step",
        mode: str = "auto",
        every: int = 0,
        enabled: bool = True,
    ):
        self.enabled, self.total, self.desc, self.unit = enabled, total, desc, unit
        self.marks = {max(1, round(total * k / 10)) for k in range(1, 11)} if every <= 0 else None
        self.every, self.n = max(1, every), initial
        self.bar = None
        if enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty())):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc or None, unit=unit, dynamic_ncols=True, mininterval=0.5
            )
        self._t0, self._s0 = time.perf_counter(), initial

    def update(self, n: int = 1, **shown):
        self.set(self.n + n, **shown)

    def set(self, position: int, **shown):
        crossed = range(self.n + 1, position + 1)
        self.n = position
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(position - self.bar.n)
            if shown:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif position == self.total or any(self._due(i) for i in crossed):
            self.log(self._line(position, shown))

    def _due(self, i: int) -> bool:
        return i in self.marks if self.marks is not None else i % self.every == 0

    def _line(self, position: int, shown: dict) -> str:
        done, elapsed = position - self._s0, time.perf_counter() - self._t0
        eta = elapsed / done * (self.total - position) if done else float("nan")
        parts = [
            f"{self.desc}: {self.unit} {position}/{self.total}" if self.desc else f"{self.unit} {position}/{self.total}"
        ]
        parts += [f"{k} {v:.4g}" for k, v in shown.items()]
        return " | ".join(parts + [f"{_duration(elapsed)} elapsed, eta {_duration(eta)}"])

    def log(self, message: str):
        """A line for the user (rank 0's terminal and the rank's log file, through absl.logging)."""
        if self.enabled:
            logging.info(message)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def track(it, total: int, desc: str, enabled: bool = True, unit: str = "image"):
    """Iterates ``it`` with a ``Progress`` of ``total`` units (nothing shown when not ``enabled``)."""
    if not enabled:
        yield from it
        return
    counter = Progress(total, desc=desc, unit=unit)
    try:
        for item in it:
            yield item
            counter.update(1)
    finally:
        counter.close()


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
