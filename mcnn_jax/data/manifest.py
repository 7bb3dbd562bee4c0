"""Import any screen described by a table (one row per field) into an image store: ``mcnn-data manifest``.

The table (CSV) has ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``, any other ``Metadata_*`` columns
(all kept in the store's metadata under their own names), one column per channel holding a file path, and a
label. This is the layout of DeepProfiler's index and of CellProfiler's ``LoadData`` CSVs:

- A channel ``X`` is the column ``X`` (a path), or ``FileName_X`` joined to ``PathName_X`` when the table has
  one (LoadData's layout). Without ``channels`` the channels are the ``FileName_*`` columns, or else every
  column that is not ``Metadata_*``, ``PathName_*`` or a label column. A relative path is relative to the
  table's folder. A file with several channels (an OME-TIFF) adds all of them (named ``X_0``, ``X_1``, ...),
  read by its axes (``mcnn_jax.data.images``; ``planes`` picks a Z / T plane).
- The label: ``label`` names the class column (default: the first of ``LABEL_COLUMNS`` present), or, with
  ``label_table``, one or more treatment columns (``Metadata_Compound,Metadata_Concentration``) looked up in a
  second table (``table_keys``: its matching columns, default the same names; ``table_class``: its class
  column), as BBBC021's MoA table maps (compound, concentration). Numbers match as numbers (``0.30`` = ``0.3``).
  A row without a class is an error, or is left out with ``drop_unlabelled``.
- The store's ``compound`` / ``concentration`` come from ``Metadata_Compound`` / ``Metadata_Concentration``
  when present (for leave-one-compound-out); intensities are processed as by the BBBC021 importer.

Errors name the table and the row: a missing column, an empty channel cell, a duplicate (plate, well, site), a
missing or unreadable file, a size / dtype / channel count that differs from the first row. Rerunning an
interrupted import resumes it; ``COMPLETE`` is written last.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mcnn_jax.data._util import read_csv
from mcnn_jax.data.images import center_crop, read_image
from mcnn_jax.data.pipeline import write_images
from mcnn_jax.data.store import DEFAULT_CODEC, ImportDataError, StoreWriter

KEYS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
LABEL_COLUMNS = ("Metadata_Class", "Metadata_MoA", "Metadata_moa", "Class", "class", "label", "moa")


@dataclass(frozen=True)
class Field:
    """One row of the table: a field of view and its channel files."""

    line: int  # row number in the table (the header is row 1)
    plate: str
    well: str
    site: str
    files: tuple[Path, ...]  # one per channel column, absolute
    label: str
    meta: dict  # the row's Metadata_* columns


def _norm(value: str) -> str:
    """A table value as a lookup key: numbers compare as numbers."""
    try:
        return repr(round(float(value), 9))
    except ValueError:
        return value.strip()


def channel_columns(
    header: Sequence[str], channels: Sequence[str] | None, label_cols: Sequence[str], where: str
) -> list[tuple[str, str, str | None]]:
    """(channel name, file column, folder column or None) per channel; see the module docstring."""
    if not channels:
        channels = [h[len("FileName_") :] for h in header if h.startswith("FileName_")] or [
            h for h in header if not h.startswith(("Metadata_", "PathName_")) and h not in label_cols
        ]
    if not channels:
        raise ImportDataError(f"{where}: no channel columns (the header is {list(header)}); name them with --channels")
    out = []
    for ch in channels:
        if ch in header:
            out.append((ch, ch, None))
        elif f"FileName_{ch}" in header:
            out.append((ch, f"FileName_{ch}", f"PathName_{ch}" if f"PathName_{ch}" in header else None))
        else:
            raise ImportDataError(
                f"{where}: no column {ch!r} or 'FileName_{ch}' for channel {ch}; the header is {list(header)}"
            )
    return out


def _label_lookup(label_cols, label_table, table_keys, table_class):
    """The class of a row from its label columns: a dict keyed by the normalised values, or None (the value
    itself is the class)."""
    if label_table is None:
        return None
    keys = list(table_keys or label_cols)
    if len(keys) != len(label_cols):
        raise ImportDataError(f"{len(label_cols)} label columns {list(label_cols)} but {len(keys)} table keys {keys}")
    try:
        rows = read_csv(label_table, [*keys, table_class])
    except ValueError as e:
        raise ImportDataError(str(e)) from None
    return {tuple(_norm(r[k]) for k in keys): r[table_class] for r in rows}


def _file(base: Path, row: dict, col: str, folder_col: str | None) -> Path:
    rel = row[col]
    if folder_col and row.get(folder_col):
        rel = f"{row[folder_col]}/{rel}"
    p = Path(rel)
    return p if p.is_absolute() else base / p


def read_manifest(
    index,
    channels: Sequence[str] | None = None,
    label: str | Sequence[str] | None = None,
    label_table=None,
    table_keys: Sequence[str] | None = None,
    table_class: str = "class",
    drop_unlabelled: bool = False,
) -> tuple[list[str], list[Field]]:
    """Reads and checks the table; returns (channel names, fields) in table order (no file is opened)."""
    index = Path(index)
    try:
        table = read_csv(index, KEYS)
    except ValueError as e:
        raise ImportDataError(str(e)) from None
    if not table:
        raise ImportDataError(f"{index}: the table has no rows")
    header = list(table[0])
    if isinstance(label, str):
        label = [c for c in label.split(",") if c]
    label_cols = list(label or [next((c for c in LABEL_COLUMNS if c in header), "")])
    missing = [c for c in label_cols if c not in header]
    if missing:
        raise ImportDataError(
            f"{index}: no label column {missing[0]!r} (choose one with --label; the header is {header})"
        )
    cols = channel_columns(header, channels, label_cols, str(index))
    lookup = _label_lookup(label_cols, label_table, table_keys, table_class)
    fields, seen = [], {}
    for k, r in enumerate(table, start=2):
        for ch, col, _ in cols:
            if not r.get(col):
                raise ImportDataError(f"{index} row {k}: the {ch} channel is missing (empty column {col})")
        key = tuple(r[c] for c in KEYS)
        if key in seen:
            raise ImportDataError(f"{index} rows {seen[key]} and {k}: the same (plate, well, site) {key}")
        seen[key] = k
        cls = r[label_cols[0]] if lookup is None else lookup.get(tuple(_norm(r[c]) for c in label_cols))
        if not cls:
            if drop_unlabelled:
                continue
            raise ImportDataError(
                f"{index} row {k}: no class for {', '.join(f'{c}={r[c]!r}' for c in label_cols)}"
                + (f" in {label_table}" if lookup is not None else "")
                + " (or pass --drop-unlabelled)"
            )
        fields.append(
            Field(
                k,
                *key,
                tuple(_file(index.parent, r, c, d) for _, c, d in cols),
                cls,
                {c: v for c, v in r.items() if c.startswith("Metadata_")},
            )
        )
    if not fields:
        raise ImportDataError(f"{index}: no labelled rows")
    return [ch for ch, _, _ in cols], fields


def read_manifest_field(
    f: Field, channels: Sequence[str], index: Path, planes=None, like=None, crop=None
) -> np.ndarray:
    """Reads a field's channel files -> [H, W, C]; ``like`` = (shape, dtype, channels per file) of the first;
    ``crop`` = (h, w): the central part only."""
    parts = []
    for ch, path in zip(channels, f.files):
        where = f"{path} ({index} row {f.line}, {ch} channel)"
        a = read_image(path, planes, where)
        if like is not None:
            shape, dtype, counts = like
            if a.shape[:2] != shape or a.dtype != dtype or a.shape[2] != counts[len(parts)]:
                raise ImportDataError(
                    f"{where} is {a.shape[0]}x{a.shape[1]}x{a.shape[2]} {a.dtype}; the first row's "
                    f"is {shape[0]}x{shape[1]}x{counts[len(parts)]} {np.dtype(dtype)}"
                )
        elif parts and (a.shape[:2] != parts[0].shape[:2] or a.dtype != parts[0].dtype):
            raise ImportDataError(
                f"{where} is {a.shape[0]}x{a.shape[1]} {a.dtype}, its row's first channel "
                f"{parts[0].shape[0]}x{parts[0].shape[1]} {parts[0].dtype}"
            )
        parts.append(a)
    return center_crop(np.concatenate(parts, axis=-1), crop, f"{index} row {f.line}")


def _store_metadata(fields: Sequence[Field]) -> dict:
    """The store's metadata columns: class, compound, concentration, plate, well, site, file, row + Metadata_*."""
    cols = sorted({c for f in fields for c in f.meta})

    def conc(f):
        try:
            return float(f.meta.get("Metadata_Concentration", 0.0) or 0.0)
        except ValueError:
            return 0.0

    md = {
        "class": [f.label for f in fields],
        "compound": [f.meta.get("Metadata_Compound", "") for f in fields],
        "concentration": [conc(f) for f in fields],
        "plate": [f.plate for f in fields],
        "well": [f.well for f in fields],
        "site": [int(f.site) if f.site.isdigit() else f.site for f in fields],
        "file": [str(f.files[0]) for f in fields],
        "row": [f.line for f in fields],
    }
    md.update({c: [f.meta.get(c, "") for f in fields] for c in cols})
    return md


def import_manifest(
    index,
    out,
    *,
    channels: Sequence[str] | None = None,
    label=None,
    label_table=None,
    table_keys: Sequence[str] | None = None,
    table_class: str = "class",
    drop_unlabelled: bool = False,
    planes: Mapping[str, int] | None = None,
    crop=None,
    scaling: str = "plate",
    illumination: bool = False,
    percentiles=(0.1, 99.9),
    dtype: str | None = None,
    codec: str = DEFAULT_CODEC,
    overwrite: bool = False,
    workers: int = 2,
    progress: bool = True,
    extra_info: dict | None = None,
) -> Path:
    """Imports the screen the table ``index`` describes into the store ``out``; see the module docstring.
    ``crop`` = (h, w) keeps the central h x w of every field."""
    index, out = Path(index), Path(out)
    names, fields = read_manifest(index, channels, label, label_table, table_keys, table_class, drop_unlabelled)
    for f in fields:  # fail fast on missing files, before any pixel is read
        for ch, p in zip(names, f.files):
            if not p.is_file():
                raise ImportDataError(f"missing image {p} ({index} row {f.line}, {ch} channel)")
    parts = [read_image(p, planes, f"{p} ({index} row {fields[0].line})") for p in fields[0].files]
    like = (parts[0].shape[:2], parts[0].dtype, [a.shape[2] for a in parts])
    first = read_manifest_field(fields[0], names, index, planes, like, crop)
    channel_names = [n if k == 1 else f"{n}_{j}" for n, k in zip(names, like[2]) for j in range(k)]
    class_names = sorted({f.label for f in fields})
    digest = hashlib.sha256(
        "\n".join(f"{f.line}|{'|'.join(map(str, f.files))}|{f.label}" for f in fields).encode()
    ).hexdigest()
    fingerprint = dict(
        kind="manifest",
        rows=digest,
        scaling=scaling,
        illumination=bool(illumination),
        percentiles=list(percentiles),
        planes=dict(planes or {}),
        index=str(index.resolve()),
        crop=list(crop) if crop else None,
    )
    writer = StoreWriter(
        out, len(fields), first.shape, np.dtype(dtype or first.dtype).name, codec, fingerprint, overwrite
    )
    write_images(
        writer,
        [f.plate for f in fields],
        lambda i: read_manifest_field(fields[i], names, index, planes, like, crop),
        scaling=scaling,
        illumination=illumination,
        percentiles=percentiles,
        workers=workers,
        progress=progress,
    )
    info = dict(
        extra_info or {},
        source="manifest",
        index=str(index.resolve()),
        scaling=scaling,
        percentiles=list(percentiles),
        illumination=bool(illumination),
        source_dtype=str(first.dtype),
    )
    return writer.finish(
        [class_names.index(f.label) for f in fields], class_names, _store_metadata(fields), channel_names, info
    )
