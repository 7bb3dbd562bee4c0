"""Import an OME-Zarr high-content-screening plate (NGFF HCS layout) into an image store: ``mcnn-data ome-zarr``.

A plate is a zarr group whose metadata lists its wells (``plate.wells[].path``, e.g. ``B/3``); each well group
lists its fields (``well.images[].path``), and each field is a multiscale image (``multiscales[0]``: named axes,
one array per resolution level). NGFF 0.4 keeps the metadata in ``.zattrs`` of zarr v2 groups; NGFF 0.5 in
``zarr.json`` (``attributes.ome``) of zarr v3 groups. The metadata is JSON and is read as such; the arrays are
read with TensorStore (``zarr`` / ``zarr3`` drivers). A field's axes (``t``, ``c``, ``z``, ``y``, ``x``) are
resolved to [H, W, C] as for a TIFF (``mcnn_jax.data.images``: ``planes`` picks a Z / T plane).

Labels: a table (``labels``, CSV) with ``Metadata_Well`` (``B03``, ``B3`` and ``B/3`` match the same well) and
a class column (``label``); without one, every field has the class ``unlabelled`` (a store for inference).
The store's metadata holds the plate's name, the well (``B03``), the well path, the field path and its
1-based index (``site``); the channel names come from ``omero.channels[].label`` when present.
``write_plate`` writes such a plate (tests and benchmarks use it).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import tensorstore as ts

from mcnn_jax.data._util import atomic_write_json, read_csv
from mcnn_jax.data.images import center_crop, check_dtype, to_yxc
from mcnn_jax.data.manifest import LABEL_COLUMNS
from mcnn_jax.data.pipeline import write_images
from mcnn_jax.data.store import DEFAULT_CODEC, ImportDataError, StoreWriter

VERSIONS = ("0.4", "0.5")


@dataclass(frozen=True)
class FieldImage:
    """One field of view of the plate."""

    well: str  # B03
    well_path: str  # B/3
    field: str  # the field's path in its well
    site: int  # 1-based position in the well's list
    array: Path  # the zarr array of the chosen level
    zarr_format: int
    axes: str  # e.g. CYX


def _attrs(group: Path) -> tuple[dict, int]:
    """The OME attributes of a zarr group and its zarr format (2 or 3)."""
    try:
        if (group / "zarr.json").is_file():
            attrs = json.loads((group / "zarr.json").read_text()).get("attributes", {})
            return attrs.get("ome", attrs), 3
        if (group / ".zattrs").is_file():
            return json.loads((group / ".zattrs").read_text()), 2
    except ValueError as e:
        raise ImportDataError(f"{group}: unreadable zarr metadata ({e})") from None
    raise ImportDataError(f"{group} is not a zarr group (no zarr.json or .zattrs)")


def well_name(path_or_name: str) -> str:
    """``B/3``, ``B3``, ``b03`` -> ``B03``; other names are kept."""
    m = re.fullmatch(r"([A-Za-z]+)[/_]?0*(\d+)", path_or_name.strip())
    return f"{m.group(1).upper()}{int(m.group(2)):02d}" if m else path_or_name.strip()


def _field(plate: Path, well_path: str, k: int, image: str, level: int) -> FieldImage:
    group = plate / well_path / image
    attrs, fmt = _attrs(group)
    try:
        ms = attrs["multiscales"][0]
        axes = "".join((a["name"] if isinstance(a, dict) else a)[0].upper() for a in ms["axes"])
        datasets = ms["datasets"]
    except (KeyError, IndexError, TypeError):
        raise ImportDataError(f"{group}: no multiscales image metadata (axes, datasets)") from None
    if not 0 <= level < len(datasets):
        raise ImportDataError(f"{group}: level {level} does not exist (the image has {len(datasets)} levels)")
    return FieldImage(well_name(well_path), well_path, image, k + 1, group / datasets[level]["path"], fmt, axes)


def read_plate(plate, level: int = 0) -> tuple[dict, list[FieldImage]]:
    """Reads the plate's metadata -> (plate attributes, its fields in well order); no pixel is read."""
    plate = Path(plate)
    attrs, _ = _attrs(plate)
    if "plate" not in attrs:
        raise ImportDataError(f"{plate} is a zarr group but not an HCS plate (no 'plate' metadata)")
    paths = [w["path"] for w in attrs["plate"].get("wells", [])]
    twice = sorted({w for w in paths if paths.count(w) > 1})
    if twice:
        raise ImportDataError(f"{plate}: the plate lists well(s) {twice} more than once")
    fields = []
    for w in attrs["plate"].get("wells", []):
        wattrs, _ = _attrs(plate / w["path"])
        images = wattrs.get("well", {}).get("images", [])
        if not images:
            raise ImportDataError(f"{plate / w['path']}: the well lists no fields (well.images)")
        if len({im["path"] for im in images}) != len(images):
            raise ImportDataError(f"{plate / w['path']}: the well lists a field more than once")
        fields += [_field(plate, w["path"], k, im["path"], level) for k, im in enumerate(images)]
    if not fields:
        raise ImportDataError(f"{plate}: the plate lists no wells")
    return attrs, fields


def _channels(plate: Path, f: FieldImage) -> list[str]:
    attrs, _ = _attrs(plate / f.well_path / f.field)
    return [c.get("label", "") for c in attrs.get("omero", {}).get("channels", [])]


def read_ome_zarr_field(f: FieldImage, planes=None, like=None, crop=None) -> np.ndarray:
    """Reads a field's array with TensorStore -> [H, W, C] (its central ``crop`` = (h, w) if given); ``like`` =
    (shape, dtype) of the first field."""
    driver = "zarr3" if f.zarr_format == 3 else "zarr"
    try:
        a = (
            ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(f.array)}}, read=True)
            .result()
            .read()
            .result()
        )
    except Exception as e:  # noqa: BLE001 - TensorStore raises ValueError / OSError variants
        raise ImportDataError(f"cannot read the zarr array {f.array} (well {f.well}): {e}") from None
    where = f"{f.array} (well {f.well})"
    a = center_crop(check_dtype(to_yxc(np.asarray(a), f.axes, where, planes), where), crop, where)
    if like is not None and (a.shape != like[0] or a.dtype != like[1]):
        raise ImportDataError(
            f"{f.array} (well {f.well}, field {f.field}) is {a.shape} {a.dtype}; the first "
            f"field is {like[0]} {np.dtype(like[1])}"
        )
    return a


def _labels(fields: Sequence[FieldImage], labels, label: str | None, drop: bool):
    if labels is None:
        return list(fields), ["unlabelled"] * len(fields)
    try:
        rows = read_csv(labels, ["Metadata_Well"])
    except ValueError as e:
        raise ImportDataError(str(e)) from None
    col = label or next((c for c in LABEL_COLUMNS if rows and c in rows[0]), None)
    if col is None or (rows and col not in rows[0]):
        raise ImportDataError(f"{labels}: no class column {col!r} (choose one with --label)")
    table = {well_name(r["Metadata_Well"]): r[col] for r in rows}
    missing = [f.well for f in fields if not table.get(f.well)]
    if missing and not drop:
        raise ImportDataError(f"{labels}: no class for well(s) {sorted(set(missing))[:10]} (or pass --drop-unlabelled)")
    kept = [f for f in fields if table.get(f.well)]
    return kept, [table[f.well] for f in kept]


def import_ome_zarr(
    plate,
    out,
    *,
    level: int = 0,
    labels=None,
    label: str | None = None,
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
    """Imports the OME-Zarr plate ``plate`` into the store ``out``; see the module docstring. ``crop`` = (h, w)
    keeps the central h x w of every field."""
    plate, out = Path(plate), Path(out)
    attrs, fields = read_plate(plate, level)
    fields, classes = _labels(fields, labels, label, drop_unlabelled)
    if not fields:
        raise ImportDataError(f"{plate}: no field has a class in {labels}")
    first = read_ome_zarr_field(fields[0], planes, crop=crop)
    like = (first.shape, first.dtype)
    names = _channels(plate, fields[0])
    if len(names) != first.shape[2] or not all(names):
        names = [f"c{i}" for i in range(first.shape[2])]
    plate_name = str(attrs["plate"].get("name") or plate.stem)
    class_names = sorted(set(classes))
    digest = hashlib.sha256("\n".join(f"{f.array}|{c}" for f, c in zip(fields, classes)).encode()).hexdigest()
    fingerprint = dict(
        kind="ome-zarr",
        fields=digest,
        level=level,
        scaling=scaling,
        illumination=bool(illumination),
        percentiles=list(percentiles),
        planes=dict(planes or {}),
        plate=str(plate.resolve()),
        crop=list(crop) if crop else None,
    )
    writer = StoreWriter(
        out, len(fields), first.shape, np.dtype(dtype or first.dtype).name, codec, fingerprint, overwrite
    )
    write_images(
        writer,
        [plate_name] * len(fields),
        lambda i: read_ome_zarr_field(fields[i], planes, like, crop),
        scaling=scaling,
        illumination=illumination,
        percentiles=percentiles,
        workers=workers,
        progress=progress,
    )
    n = len(fields)
    metadata = {
        "class": classes,
        "compound": [""] * n,
        "concentration": [0.0] * n,
        "plate": [plate_name] * n,
        "well": [f.well for f in fields],
        "well_path": [f.well_path for f in fields],
        "field": [f.field for f in fields],
        "site": [f.site for f in fields],
    }
    info = dict(
        extra_info or {},
        source="ome-zarr",
        plate=str(plate.resolve()),
        level=level,
        scaling=scaling,
        percentiles=list(percentiles),
        illumination=bool(illumination),
        source_dtype=str(first.dtype),
        ngff_version=str(attrs.get("version") or attrs["plate"].get("version", "")),
    )
    return writer.finish([class_names.index(c) for c in classes], class_names, metadata, names, info)


# --- writing a plate (tests, benchmarks) ---------------------------------------------------------------------
def _group(path: Path, attrs: dict, version: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if version == "0.5":
        atomic_write_json(
            path / "zarr.json", dict(zarr_format=3, node_type="group", attributes={"ome": dict(attrs, version=version)})
        )
    else:
        atomic_write_json(path / ".zgroup", dict(zarr_format=2))
        atomic_write_json(
            path / ".zattrs", {k: dict(v, version=version) if k in ("plate", "well") else v for k, v in attrs.items()}
        )


def _array(path: Path, image: np.ndarray, version: str) -> None:
    kv = {"driver": "file", "path": str(path)}
    if version == "0.5":
        spec = {
            "driver": "zarr3",
            "kvstore": kv,
            "metadata": {
                "shape": list(image.shape),
                "data_type": image.dtype.name,
                "dimension_names": list("cyx"),
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, *image.shape[1:]]}},
            },
        }
    else:
        spec = {
            "driver": "zarr",
            "kvstore": kv,
            "metadata": {
                "shape": list(image.shape),
                "chunks": [1, *image.shape[1:]],
                "dtype": image.dtype.str,
                "dimension_separator": "/",
            },
        }
    ts.open(spec, create=True, delete_existing=True).result().write(image).result()


def write_plate(
    path,
    wells: Mapping[str, Sequence[np.ndarray]],
    version: str = "0.4",
    channels: Sequence[str] = (),
    name: str = "plate",
) -> Path:
    """Writes an NGFF HCS plate: ``wells`` maps a well path (``B/3``) to its fields, each [C, Y, X]."""
    if version not in VERSIONS:
        raise ValueError(f"NGFF version must be one of {VERSIONS}, got {version!r}")
    path = Path(path)
    rows = sorted({w.split("/")[0] for w in wells})
    cols = sorted({w.split("/")[1] for w in wells}, key=lambda c: (len(c), c))
    _group(
        path,
        {
            "plate": {
                "name": name,
                "rows": [{"name": r} for r in rows],
                "columns": [{"name": c} for c in cols],
                "wells": [
                    {"path": w, "rowIndex": rows.index(w.split("/")[0]), "columnIndex": cols.index(w.split("/")[1])}
                    for w in wells
                ],
            }
        },
        version,
    )
    for w, images in wells.items():
        _group(path / w, {"well": {"images": [{"path": str(k)} for k in range(len(images))]}}, version)
        for k, img in enumerate(images):
            axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
            attrs = {
                "multiscales": [
                    {
                        "axes": axes,
                        "datasets": [
                            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}
                        ],
                    }
                ],
                "omero": {"channels": [{"label": c} for c in channels]},
            }
            if version == "0.4":
                attrs["multiscales"][0]["version"] = version
            _group(path / w / str(k), attrs, version)
            _array(path / w / str(k) / "0", np.asarray(img), version)
    return path
