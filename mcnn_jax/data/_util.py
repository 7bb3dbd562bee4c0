"""Small helpers shared by the data modules: atomic file writes and robust CSV reading."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from mcnn_jax.metrics_log import Progress, track
from mcnn_jax.runtime import ensure_terminal_logging


def fsync_dir(path: Path) -> None:
    """Flushes a directory entry (so a rename inside it survives a crash); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: a temporary file in the same directory, fsync, os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_csv(path: Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Reads a CSV with a header row into a list of dicts.

    Any line ending is accepted: LF, CRLF and the old Mac CR-only files (the csv module does this when the file
    is opened with ``newline=""``). A UTF-8 byte-order mark is dropped. Raises ValueError naming the file and
    the missing columns if ``required`` columns are absent.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"CSV file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text CSV file ({e})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: missing CSV column(s) {missing}; the header has {header}")
    reader.fieldnames = header
    rows = []
    for row in reader:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        rows.append({k: (v.strip() if isinstance(v, str) else "") for k, v in row.items() if k is not None})
    return rows


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Writes a CSV atomically (LF line endings)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    atomic_write_text(Path(path), buf.getvalue())


def progress_counter(total: int, desc: str):
    """A ``metrics_log.Progress`` over ``total`` images: call ``update(n)`` and ``close()``."""
    ensure_terminal_logging()
    return Progress(total, desc=desc, unit="image")


def progress(it, total: int, desc: str, enabled: bool = True):
    """Iterates ``it`` with progress shown as ``progress_counter`` does (nothing when not ``enabled``)."""
    if enabled:
        ensure_terminal_logging()
    yield from track(it, total, desc, enabled)
