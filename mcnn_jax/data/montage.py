"""Whole-well montages: the sites of each well of a store stitched into one image, written as a new store.

    montage_store("data/store", "data/montage-2x2-row", grid=(2, 2), order="row")   # one [2H, 2W, C] image a well

The wells are the (``plate``, ``well``) pairs of the source store's metadata, in the order they first appear;
site ``s`` (the ``site`` column, 1..rows*cols) goes to grid cell ``k = s - 1``: row ``k // cols``, column
``k % cols`` in ``"row"`` order (site 1 top-left, then left to right, row after row); in ``"snake"`` order
(boustrophedon, as many microscopes acquire) the second, fourth, ... rows run right to left.

Every well must have exactly its rows*cols sites: a well with a site missing is an ImportDataError naming the
plate, the well and the missing sites, or with ``skip_incomplete`` is left out (counted in a logged warning and
in store.json); a site that appears twice or lies outside 1..rows*cols, and a well whose sites have different
labels, are always errors. The montage store keeps the source's classes and channels. Its metadata has one row
per well: the columns whose value is the same on every site of each well (class, compound, concentration, plate,
well, ...), without ``site``, plus ``source_indices`` (the source images of the well, in site order); columns
that vary within a well (file names, image numbers) are dropped and named in store.json, whose ``montage``
record also has the grid, the order and the source store.

The store is written with ``StoreWriter``: it is complete only once its marker is written; a rerun with the same
inputs returns a complete montage at once or resumes an interrupted one (wells already written are kept), while a
complete montage of other inputs (another grid, order or codec, or a source store rebuilt since: another
``created`` time) is replaced only with ``overwrite``. A lock file in the store folder makes a second process
wait for the first and then reuse its montage. Images are read one well at a time (the next well's reads run
while this one is stitched and written; TensorStore futures, no forked workers).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from mcnn_jax.data._util import progress as progress_bar
from mcnn_jax.data.store import (
    CODECS,
    DEFAULT_CODEC,
    ImportDataError,
    Store,
    StoreError,
    StoreWriter,
    is_complete,
    open_store,
)

ORDERS = ("row", "snake")
REQUIRED_COLUMNS = ("plate", "well", "site")
LOCK = ".montage.lock"  # held while a montage is written, so two runs sharing a montage store do not both write it
_GRID = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True)
class Well:
    """One well of the source store: its plate and name and its images' indices, in site order."""

    plate: str
    well: str
    indices: tuple[int, ...]

    def __str__(self) -> str:
        return f"plate {self.plate!r} well {self.well!r}"


def parse_grid(grid) -> tuple[int, int]:
    """(rows, cols) of ``"RxC"`` (e.g. ``"2x2"``) or of a (rows, cols) pair; ValueError for anything else."""
    if isinstance(grid, str):
        m = _GRID.match(grid)
        rows, cols = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    else:
        try:
            rows, cols = (int(v) for v in grid)
        except (TypeError, ValueError):
            rows, cols = 0, 0
    if rows < 1 or cols < 1:
        raise ValueError(f"a montage grid is ROWSxCOLS with positive whole numbers, e.g. 2x2 or 3x4; got {grid!r}")
    return rows, cols


def montage_name(grid, order: str = "row") -> str:
    """The folder name of a montage store: ``montage-2x2-row``."""
    rows, cols = parse_grid(grid)
    return f"montage-{rows}x{cols}-{_order(order)}"


def _order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"the montage order must be one of {ORDERS} (row-major or boustrophedon), got {order!r}")
    return order


def grid_cells(grid, order: str = "row") -> list[tuple[int, int]]:
    """The (row, column) of sites 1, 2, ..., rows*cols in ``order`` (see the module docstring)."""
    rows, cols = parse_grid(grid)
    _order(order)
    cells = []
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        cells.append((r, cols - 1 - c if order == "snake" and r % 2 else c))
    return cells


def stitch(tiles: np.ndarray, grid, order: str = "row") -> np.ndarray:
    """The [rows*H, cols*W, C] montage of ``tiles`` [rows*cols, H, W, C] (sites 1, 2, ... in that order)."""
    rows, cols = parse_grid(grid)
    n, h, w, c = tiles.shape
    if n != rows * cols:
        raise ValueError(f"a {rows}x{cols} montage takes {rows * cols} tiles, got {n}")
    out = np.empty((rows * h, cols * w, c), tiles.dtype)
    for tile, (r, col) in zip(tiles, grid_cells((rows, cols), order)):
        out[r * h : (r + 1) * h, col * w : (col + 1) * w] = tile
    return out


def _site_number(value, well: str, path: Path) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ImportDataError(f"{path}: {well} has site {value!r}, not a site number (1, 2, ...)")


def group_wells(store: Store, grid, skip_incomplete: bool = False) -> tuple[list[Well], list[tuple[Well, list]]]:
    """(wells, skipped): the wells of ``store`` that have every site of ``grid`` (in order of first appearance),
    and with ``skip_incomplete`` the ones left out with their missing sites. Raises ImportDataError naming the
    store and the column for metadata without plate / well / site, and naming the wells for missing (unless
    ``skip_incomplete``), duplicate or out-of-range sites and for sites with different labels."""
    rows, cols = parse_grid(grid)
    n_sites, path, meta = rows * cols, store.path, store.metadata
    for col in REQUIRED_COLUMNS:
        if col not in meta:
            hint = ""
            if "montage" in store.info:
                hint = f"; it is a montage already (of {store.info['montage'].get('source')}): use it as it is"
            raise ImportDataError(
                f"{path}: the store's metadata has no {col!r} column (it has {sorted(meta)}); a montage needs "
                f"the plate, well and site of every image{hint}"
            )
        if len(meta[col]) != store.num_images:
            raise ImportDataError(
                f"{path}: metadata column {col!r} has {len(meta[col])} values for {store.num_images} images"
            )
    by_well: dict[tuple[str, str], dict[int, list[int]]] = {}
    for i, (plate, well, site) in enumerate(zip(meta["plate"], meta["well"], meta["site"])):
        if well in ("", None):
            raise ImportDataError(
                f"{path}: image {i} has no well (an empty 'well' metadata value; a folder import records none), "
                f"so its wells cannot be stitched"
            )
        key = (str(plate), str(well))
        sites = by_well.setdefault(key, {})
        sites.setdefault(_site_number(site, f"plate {key[0]!r} well {key[1]!r}", path), []).append(i)
    labels = np.asarray(store.labels)
    wells, bad, incomplete = [], [], []
    for (plate, name), sites in by_well.items():
        well = Well(plate, name, ())
        problems = []
        outside = sorted(s for s in sites if not 1 <= s <= n_sites)
        if outside:
            problems.append(f"site(s) {outside} outside 1..{n_sites}")
        for s, idx in sorted(sites.items()):
            if len(idx) > 1:
                problems.append(f"site {s} appears {len(idx)} times (images {idx})")
        classes = sorted({store.class_names[labels[i]] for idx in sites.values() for i in idx})
        if len(classes) > 1:
            problems.append(f"sites of different classes {classes}")
        if problems:
            bad.append(f"{well}: {', '.join(problems)}")
            continue
        missing = [s for s in range(1, n_sites + 1) if s not in sites]
        if missing:
            incomplete.append((well, missing))
            continue
        wells.append(Well(plate, name, tuple(sites[s][0] for s in range(1, n_sites + 1))))
    if bad:
        raise ImportDataError(
            f"{path}: {len(bad)} well(s) cannot be stitched into a {rows}x{cols} montage: {_some(bad)}"
            + ("; is the grid right?" if any("outside" in b for b in bad) else "")
        )
    if incomplete and not skip_incomplete:
        raise ImportDataError(
            f"{path}: {len(incomplete)} well(s) lack sites of the {rows}x{cols} grid ({n_sites} sites a well): "
            f"{_some([f'{w}: missing site(s) {m}' for w, m in incomplete])}; leave them out with "
            f"--skip-incomplete (data.montage.skip_incomplete=True)"
        )
    if not wells:
        raise ImportDataError(f"{path}: no well has all {n_sites} sites of the {rows}x{cols} grid")
    return wells, incomplete


def _some(items: Sequence[str], k: int = 5) -> str:
    return "; ".join(items[:k]) + (f"; ... ({len(items) - k} more)" if len(items) > k else "")


def well_metadata(store: Store, wells: Sequence[Well]) -> tuple[dict[str, list], list[str]]:
    """(metadata, dropped): one row per well of the columns that are constant on every well's sites (without
    ``site``), plus ``source_indices``; ``dropped`` names the columns that vary within a well."""
    out, dropped = {}, []
    for col, values in store.metadata.items():
        if col == "site":
            continue
        if len(values) != store.num_images:
            raise ImportDataError(
                f"{store.path}: metadata column {col!r} has {len(values)} values for {store.num_images} images"
            )
        per_well = []
        for w in wells:
            distinct = {json.dumps(values[i], sort_keys=True) for i in w.indices}
            if len(distinct) > 1:
                dropped.append(col)
                break
            per_well.append(values[w.indices[0]])
        else:
            out[col] = per_well
    out["source_indices"] = [list(w.indices) for w in wells]
    return out, dropped


def _read_wells(store: Store, wells: Sequence[Well], todo: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(k, tiles [sites, H, W, C] in site order) for each well k of ``todo``; the next well's reads run meanwhile."""

    def start(k):
        return [store.read_async(i) for i in wells[k].indices]

    ahead = start(todo[0]) if todo else []
    for j, k in enumerate(todo):
        futures, ahead = ahead, (start(todo[j + 1]) if j + 1 < len(todo) else [])
        yield k, np.stack([f.result() for f in futures])


@contextlib.contextmanager
def _locked(dst: Path):
    """Holds an exclusive lock on ``dst`` (a file in it) while a montage is written there."""
    if dst.exists() and not dst.is_dir():
        raise StoreError(f"{dst} exists and is not a directory")
    try:
        dst.mkdir(parents=True, exist_ok=True)
        f = open(dst / LOCK, "a")
    except OSError as e:
        raise StoreError(f"cannot write the montage store {dst}: {e}") from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: the montage is still atomic, only not serialised
            pass
        yield


def _reusable(dst: Path, fingerprint: dict) -> bool:
    """True if ``dst`` is a complete montage made from the same inputs."""
    if not is_complete(dst):
        return False
    try:
        return open_store(dst).info.get("montage", {}).get("fingerprint") == fingerprint
    except StoreError:
        return False


def montage_store(
    src,
    dst,
    grid=(2, 2),
    order: str = "row",
    skip_incomplete: bool = False,
    *,
    codec: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes the whole-well montage of the complete store ``src`` into the store ``dst`` and returns ``dst``
    (see the module docstring). ``grid``: (rows, cols) or ``"RxC"``; ``order``: ``"row"`` or ``"snake"``;
    ``codec``: the image compression (default: the source's). Returns at once if ``dst`` is a complete montage
    of the same inputs; a complete store made otherwise is replaced only with ``overwrite``."""
    src, dst = Path(src), Path(dst)
    rows, cols = parse_grid(grid)
    _order(order)
    if dst.resolve() == src.resolve():
        raise ValueError(f"the montage of {src} must go to another store than its source")
    store = open_store(src)  # names the path if it is missing, incomplete or damaged
    codec = codec or (store.info.get("codec") if store.info.get("codec") in CODECS else DEFAULT_CODEC)
    wells, skipped = group_wells(store, (rows, cols), skip_incomplete)
    digest = hashlib.sha256("\n".join(f"{w.plate}|{w.well}|{w.indices}" for w in wells).encode()).hexdigest()
    fingerprint = dict(
        kind="montage",
        source=str(src.resolve()),
        source_created=store.info.get("created"),
        source_images=store.num_images,
        grid=[rows, cols],
        order=order,
        wells=digest,
        codec=codec,
    )
    if skipped:
        logging.warning(
            f"montage of {src}: left out {len(skipped)} of {len(wells) + len(skipped)} wells that lack sites "
            f"of the {rows}x{cols} grid ({_some([f'{w}: missing site(s) {m}' for w, m in skipped], 3)})"
        )
    if _reusable(dst, fingerprint):
        return dst
    h, w, c = store.image_shape
    with _locked(dst):
        if _reusable(dst, fingerprint):  # finished by another process while this one waited
            return dst
        writer = StoreWriter(
            dst, len(wells), (rows * h, cols * w, c), store.dtype.name, codec, fingerprint, overwrite, max_in_flight=2
        )
        todo = [k for k in range(len(wells)) if not writer.done(k)]
        try:
            tiles = progress_bar(_read_wells(store, wells, todo), len(todo), f"montage: writing {dst.name}", progress)
            for k, t in tiles:
                writer.write(k, stitch(t, (rows, cols), order))
        finally:
            writer.drain()
        metadata, dropped = well_metadata(store, wells)
        info = {k: store.info[k] for k in ("scaling", "percentiles", "illumination", "source_dtype") if k in store.info}
        info.update(
            source="montage",
            montage=dict(
                grid=[rows, cols],
                order=order,
                source=str(src.resolve()),
                source_kind=store.info.get("source"),
                source_images=store.num_images,
                site_shape=[h, w, c],
                wells=len(wells),
                skipped_wells=[[x.plate, x.well] for x, _ in skipped],
                dropped_columns=dropped,
                fingerprint=fingerprint,
            ),
        )
        labels = [int(store.labels[x.indices[0]]) for x in wells]
        return writer.finish(labels, store.class_names, metadata, store.channels, info)
