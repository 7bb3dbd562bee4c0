"""Import BBBC021 (as the Broad distributes it) into an image store.

Inputs: ``BBBC021_v1_image.csv`` and ``BBBC021_v1_moa.csv`` in the metadata directory, and the plate folders of
single-channel 16-bit TIFFs under the images directory (``images/<Image_PathName_X>/<Image_FileName_X>``).

- Channels are stacked in the fixed order DAPI, tubulin, actin -> [H, W, 3].
- Only images whose (compound, concentration) has a mechanism of action in the moa CSV are kept (3,848 images,
  12 mechanisms + DMSO, 38 compounds besides DMSO, with the real CSVs); the class is the mechanism, the class
  names are sorted alphabetically.
- Intensities: optional per-plate illumination correction and per-channel robust scaling (see
  ``mcnn_jax.data.intensity``; default: per-plate 0.1 / 99.9 percentiles, no illumination correction).
- Metadata per image: class, compound, concentration, plate, well, site (from the file name: ``_s<k>_w``),
  replicate, table_number, image_number and the DAPI file.

Every input error (a missing or unreadable TIFF, a wrong size or dtype, a missing channel, a duplicate (plate,
well, site), CSVs without the expected columns) raises ImportDataError naming the file and the CSV row, and no
store is marked complete. An interrupted import, rerun with the same arguments, resumes (images already written
are kept). ``check_folder`` (``mcnn-data bbbc021 --check``) lists missing plate folders and files first.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from mcnn_jax.data import intensity
from mcnn_jax.data._util import read_csv
from mcnn_jax.data.pipeline import write_images
from mcnn_jax.data.store import DEFAULT_CODEC, ImportDataError, StoreWriter

IMAGE_CSV = "BBBC021_v1_image.csv"
MOA_CSV = "BBBC021_v1_moa.csv"
CHANNELS = ("DAPI", "Tubulin", "Actin")  # the stacking order of the store's channel axis
IMAGE_COLUMNS = (
    "TableNumber",
    "ImageNumber",
    "Image_FileName_DAPI",
    "Image_PathName_DAPI",
    "Image_FileName_Tubulin",
    "Image_PathName_Tubulin",
    "Image_FileName_Actin",
    "Image_PathName_Actin",
    "Image_Metadata_Plate_DAPI",
    "Image_Metadata_Well_DAPI",
    "Replicate",
    "Image_Metadata_Compound",
    "Image_Metadata_Concentration",
)
MOA_COLUMNS = ("compound", "concentration", "moa")
_SITE = re.compile(r"_s(\d+)_w\d", re.IGNORECASE)


@dataclass(frozen=True)
class Row:
    """One kept image of the image CSV."""

    line: int  # row number in the CSV (the header is row 1)
    files: tuple[str, str, str]  # relative paths (PathName/FileName) in CHANNELS order
    plate: str
    well: str
    site: int
    replicate: str
    compound: str
    concentration: float
    moa: str
    table_number: str
    image_number: str


def _conc(text: str, where: str) -> float:
    try:
        return round(float(text), 9)
    except ValueError:
        raise ImportDataError(f"{where}: concentration {text!r} is not a number") from None


def site_from_filename(name: str) -> int:
    """The site number in a BBBC021 file name: ``G10_s1_w1....tif`` -> 1 (0 if the name has none)."""
    m = _SITE.findall(name)
    return int(m[-1]) if m else 0


def read_metadata(metadata_dir) -> list[Row]:
    """Reads both CSVs and returns the images that have a mechanism of action, in CSV order."""
    metadata_dir = Path(metadata_dir)
    image_csv, moa_csv = metadata_dir / IMAGE_CSV, metadata_dir / MOA_CSV
    for p in (image_csv, moa_csv):
        if not p.is_file():
            raise ImportDataError(f"{p} not found: the metadata directory must hold {IMAGE_CSV} and {MOA_CSV}")
    try:
        images = read_csv(image_csv, IMAGE_COLUMNS)
        moas = read_csv(moa_csv, MOA_COLUMNS)
    except ValueError as e:
        raise ImportDataError(str(e)) from None
    moa = {}
    for k, r in enumerate(moas, start=2):
        moa[(r["compound"], _conc(r["concentration"], f"{moa_csv} row {k}"))] = r["moa"]
    rows = []
    for k, r in enumerate(images, start=2):
        key = (r["Image_Metadata_Compound"], _conc(r["Image_Metadata_Concentration"], f"{image_csv} row {k}"))
        if key not in moa:
            continue
        files = []
        for ch in CHANNELS:
            name, folder = r[f"Image_FileName_{ch}"], r[f"Image_PathName_{ch}"]
            if not name:
                raise ImportDataError(f"{image_csv} row {k}: the {ch} channel is missing (empty Image_FileName_{ch})")
            files.append(f"{folder}/{name}" if folder else name)
        rows.append(
            Row(
                k,
                tuple(files),
                r["Image_Metadata_Plate_DAPI"],
                r["Image_Metadata_Well_DAPI"],
                site_from_filename(r["Image_FileName_DAPI"]),
                r["Replicate"],
                key[0],
                key[1],
                moa[key],
                r["TableNumber"],
                r["ImageNumber"],
            )
        )
    if not rows:
        raise ImportDataError(f"{image_csv}: no image has a (compound, concentration) listed in {moa_csv}")
    _check_unique(rows, image_csv)
    return rows


def metadata_table(metadata_dir):
    """The MoA-annotated fields of ``read_metadata`` as a table with the cytomining column names
    (``Metadata_Plate``, ``_Well``, ``_Site``, ``_Replicate``, ``_Compound``, ``_Concentration``, ``_MoA``),
    one row per field in CSV order: the layout to join features to (``mcnn_jax.evaluation.profiles``)."""
    import pandas as pd

    rows = read_metadata(metadata_dir)
    return pd.DataFrame(
        dict(
            Metadata_Plate=[r.plate for r in rows],
            Metadata_Well=[r.well for r in rows],
            Metadata_Site=[r.site for r in rows],
            Metadata_Replicate=[r.replicate for r in rows],
            Metadata_Compound=[r.compound for r in rows],
            Metadata_Concentration=[r.concentration for r in rows],
            Metadata_MoA=[r.moa for r in rows],
        )
    )


def _check_unique(rows: list[Row], image_csv: Path) -> None:
    """No (plate, well, site) twice (the DAPI file stands in for a site when the file names have none)."""
    seen: dict = {}
    for r in rows:
        key = (r.plate, r.well, r.site) if r.site else r.files[0]
        if key in seen:
            raise ImportDataError(
                f"{image_csv} rows {seen[key]} and {r.line}: the same "
                + (f"(plate, well, site) {key}" if r.site else f"DAPI file {key}")
            )
        seen[key] = r.line


def load_image(images_dir: Path, row: Row, shape=None, dtype=None, csv_name: str = IMAGE_CSV) -> np.ndarray:
    """Reads and stacks the three channel TIFFs of a row -> [H, W, 3]; checks shape and dtype."""
    planes = []
    for ch, rel in zip(CHANNELS, row.files):
        path = images_dir / rel
        where = f"{path} ({csv_name} row {row.line}, {ch} channel)"
        if not path.is_file():
            raise ImportDataError(f"missing TIFF {where}")
        try:
            a = tifffile.imread(path)
        except Exception as e:  # noqa: BLE001 - tifffile raises many kinds for a damaged file
            raise ImportDataError(f"cannot read TIFF {where}: {type(e).__name__}: {e}") from None
        if a.size == 0:
            raise ImportDataError(f"cannot read TIFF {where}: no image data (a corrupt or truncated file)")
        a = np.squeeze(a)
        if a.ndim != 2:
            raise ImportDataError(f"{where} is not a single-channel image: shape {a.shape}")
        if a.dtype not in (np.uint8, np.uint16):
            raise ImportDataError(f"{where} has dtype {a.dtype}; expected uint8 or uint16")
        if shape is not None and a.shape != tuple(shape):
            raise ImportDataError(f"{where} is {a.shape[0]}x{a.shape[1]}, the other images are {shape[0]}x{shape[1]}")
        if dtype is not None and a.dtype != dtype:
            raise ImportDataError(f"{where} has dtype {a.dtype}, the other images have {np.dtype(dtype)}")
        planes.append(a)
    if (
        planes[0].shape != planes[1].shape
        or planes[0].shape != planes[2].shape
        or planes[0].dtype != planes[1].dtype
        or planes[0].dtype != planes[2].dtype
    ):
        raise ImportDataError(
            f"the channels of {csv_name} row {row.line} differ in size or dtype: "
            f"{[(p.shape, str(p.dtype)) for p in planes]}"
        )
    return np.stack(planes, axis=-1)


@dataclass
class FolderCheck:
    """What ``check_folder`` found: the plate folders the kept images need and the files that are absent."""

    images_dir: Path
    num_images: int  # images with a mechanism of action (the ones the import reads)
    plates: dict[str, int]  # plate folder (Image_PathName_*) -> number of its files the import needs
    missing_plates: list[str]  # plate folders that do not exist under images_dir
    missing_files: list[tuple[int, str, str]]  # (CSV row, channel, relative path) in present plate folders

    @property
    def ok(self) -> bool:
        return not self.missing_plates and not self.missing_files

    def summary(self, limit: int = 10) -> str:
        present = len(self.plates) - len(self.missing_plates)
        lines = [
            f"{self.num_images} images with a mechanism of action, in {len(self.plates)} plate folders; "
            f"{present} of them present under {self.images_dir}"
        ]
        if self.missing_plates:
            lines.append(
                f"missing plate folders ({len(self.missing_plates)}; unpack each "
                f"BBBC021_v1_images_<plate>.zip into {self.images_dir}/<week>/): " + ", ".join(self.missing_plates)
            )
        if self.missing_files:
            lines.append(f"missing files in present plate folders: {len(self.missing_files)}")
            lines += [f"  row {r} ({ch}): {self.images_dir / rel}" for r, ch, rel in self.missing_files[:limit]]
            if len(self.missing_files) > limit:
                lines.append(f"  ... and {len(self.missing_files) - limit} more")
        lines.append("ready to import" if self.ok else "not ready: the import would stop at the first missing file")
        return "\n".join(lines)


def _folder(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else "."


def check_folder(metadata_dir, images_dir) -> FolderCheck:
    """Checks a downloaded BBBC021 folder against the CSVs (file existence only, no pixel is read)."""
    images_dir = Path(images_dir)
    rows = read_metadata(metadata_dir)
    plates: dict[str, int] = {}
    for r in rows:
        for rel in r.files:
            plates[_folder(rel)] = plates.get(_folder(rel), 0) + 1
    missing_plates = sorted(p for p in plates if not (images_dir / p).is_dir())
    absent = set(missing_plates)
    missing_files = [
        (r.line, ch, rel)
        for r in rows
        for ch, rel in zip(CHANNELS, r.files)
        if _folder(rel) not in absent and not (images_dir / rel).is_file()
    ]
    return FolderCheck(images_dir, len(rows), dict(sorted(plates.items())), missing_plates, missing_files)


def import_bbbc021(
    metadata_dir,
    images_dir,
    out,
    *,
    scaling: str = "plate",
    illumination: bool = False,
    percentiles: tuple[float, float] = (0.1, 99.9),
    dtype: str | None = None,
    codec: str = DEFAULT_CODEC,
    overwrite: bool = False,
    workers: int = 2,
    progress: bool = True,
    extra_info: dict | None = None,
) -> Path:
    """Imports BBBC021 into the store ``out`` and returns its path (see the module docstring).

    ``dtype``: the stored dtype (``uint8`` / ``uint16``); None keeps the TIFFs' dtype.
    """
    images_dir, out = Path(images_dir), Path(out)
    if scaling not in intensity.SCALINGS:
        raise ValueError(f"scaling must be one of {intensity.SCALINGS}, got {scaling!r}")
    rows = read_metadata(metadata_dir)
    csv_name = str(Path(metadata_dir) / IMAGE_CSV)
    for r in rows:  # fail fast on missing files, before any pixel is read
        for ch, rel in zip(CHANNELS, r.files):
            if not (images_dir / rel).is_file():
                raise ImportDataError(f"missing TIFF {images_dir / rel} ({csv_name} row {r.line}, {ch} channel)")
    first = load_image(images_dir, rows[0], csv_name=csv_name)
    shape, src_dtype = first.shape[:2], first.dtype
    out_dtype = np.dtype(dtype or src_dtype)
    class_names = sorted({r.moa for r in rows})
    digest = hashlib.sha256("\n".join(f"{r.line}|{'|'.join(r.files)}|{r.moa}" for r in rows).encode()).hexdigest()
    fingerprint = dict(
        kind="bbbc021",
        rows=digest,
        scaling=scaling,
        illumination=bool(illumination),
        percentiles=list(percentiles),
        images_dir=str(images_dir.resolve()),
    )
    writer = StoreWriter(out, len(rows), (*shape, 3), out_dtype.name, codec, fingerprint, overwrite)
    write_images(
        writer,
        [r.plate for r in rows],
        lambda i: load_image(images_dir, rows[i], shape, src_dtype, csv_name),
        scaling=scaling,
        illumination=illumination,
        percentiles=percentiles,
        workers=workers,
        progress=progress,
    )
    labels = [class_names.index(r.moa) for r in rows]
    metadata = dict(
        **{"class": [r.moa for r in rows]},
        compound=[r.compound for r in rows],
        concentration=[r.concentration for r in rows],
        plate=[r.plate for r in rows],
        well=[r.well for r in rows],
        site=[r.site for r in rows],
        replicate=[r.replicate for r in rows],
        table_number=[r.table_number for r in rows],
        image_number=[r.image_number for r in rows],
        file_dapi=[r.files[0] for r in rows],
    )
    info = dict(
        extra_info or {},
        source="bbbc021",
        metadata_dir=str(Path(metadata_dir).resolve()),
        images_dir=str(images_dir.resolve()),
        scaling=scaling,
        percentiles=list(percentiles),
        illumination=bool(illumination),
        source_dtype=str(src_dtype),
    )
    return writer.finish(labels, class_names, metadata, [c.lower() for c in CHANNELS], info)
