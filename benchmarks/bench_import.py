"""Import throughput of the screen importers (issue 15): BBBC021, manifest and OME-Zarr; prints one JSON object.

    python benchmarks/bench_import.py [--images 24] [--scaling plate] [--workers 2]

Two screens of ``--images`` fields are generated in a temp dir (not timed): the synthetic BBBC021-layout screen
at 1024x1280x3 and the synthetic Cell Painting screen at 1080x1080x5 (16-bit, one TIFF per channel). Then, each
timed as the import call alone (``--scaling`` applied, uint16 stores, the default codec):

- ``bbbc021``: ``import_bbbc021`` on the 3-channel screen;
- ``manifest``: ``import_manifest`` on a table of the same TIFFs (3 channels), and on the Cell Painting
  screen's ``manifest.csv`` (5 channels);
- ``ome-zarr-0.4`` / ``ome-zarr-0.5``: ``import_ome_zarr`` on an NGFF plate written from the same pixels
  (``write_plate``, zarr v2 / v3, one chunk per channel plane, uncompressed).

images/s = fields / seconds; MB/s = the fields' raw source pixels (H x W x C x 2 bytes) / seconds. The files were
just written, so they are read from the page cache: this is the importers' CPU cost, not a disk's speed. With
per-plate scaling every field is read twice (statistics, then writing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcnn_jax.data.bbbc021 import CHANNELS, import_bbbc021, read_metadata
from mcnn_jax.data.cellpainting import generate_cellpainting_screen
from mcnn_jax.data.images import read_image
from mcnn_jax.data.manifest import import_manifest
from mcnn_jax.data.omezarr import import_ome_zarr, write_plate
from mcnn_jax.data.synthetic import generate_screen


def bbbc021_table(raw: Path) -> Path:
    """A manifest table listing the BBBC021-layout screen's TIFFs (paths relative to the screen)."""
    rows = read_metadata(raw)
    path = raw / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Compound", "Metadata_Class", *CHANNELS]
        )
        for r in rows:
            w.writerow([r.plate, r.well, r.site, r.compound, r.moa, *r.files])
    return path


def plate_from_table(table: Path, out: Path, version: str) -> Path:
    """An OME-Zarr plate holding the fields a manifest table lists (one well per row, one field each)."""
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    channels = [c for c in rows[0] if not c.startswith("Metadata_")]
    wells = {}
    for k, r in enumerate(rows):
        img = np.concatenate([read_image(table.parent / r[c]) for c in channels], axis=-1)
        wells[f"{chr(ord('A') + k // 24)}/{k % 24 + 1}"] = [np.ascontiguousarray(np.moveaxis(img, -1, 0))]
    return write_plate(out, wells, version, channels)


def timed(name: str, shape, n: int, fn) -> dict:
    t0 = time.perf_counter()
    fn()
    s = time.perf_counter() - t0
    mb = n * int(np.prod(shape)) * 2 / 1e6
    return dict(
        importer=name,
        shape="x".join(map(str, shape)),
        images=n,
        seconds=round(s, 2),
        images_per_s=round(n / s, 2),
        mb_per_s=round(mb / s, 1),
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--scaling", default="plate", choices=("plate", "image", "none"))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    n, opts = args.images, dict(scaling=args.scaling, workers=args.workers, progress=False, dtype="uint16")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_import_") as tmp:
        tmp = Path(tmp)
        raw3 = generate_screen(tmp / "bbbc021", n, 4, 1024, 1280, progress=False)
        table3 = bbbc021_table(raw3)
        table5 = generate_cellpainting_screen(tmp / "cp", n, 4, 1080, 1080, progress=False)
        plates = {
            (v, c): plate_from_table(t, tmp / f"plate{c}_{v}.zarr", v)
            for v in ("0.4", "0.5")
            for c, t in ((3, table3), (5, table5))
        }
        shape3, shape5 = (1024, 1280, 3), (1080, 1080, 5)
        results.append(timed("bbbc021", shape3, n, lambda: import_bbbc021(raw3, raw3, tmp / "s1", **opts)))
        for shape, table in ((shape3, table3), (shape5, table5)):
            results.append(
                timed(
                    "manifest",
                    shape,
                    n,
                    lambda: import_manifest(
                        table, tmp / f"m{shape[2]}", label="Metadata_Class" if shape[2] == 3 else "Metadata_MoA", **opts
                    ),
                )
            )
        for (v, c), plate in plates.items():
            results.append(
                timed(
                    f"ome-zarr-{v}",
                    shape3 if c == 3 else shape5,
                    n,
                    lambda: import_ome_zarr(plate, tmp / f"z{c}_{v}", **opts),
                )
            )
    out = dict(
        benchmark="import",
        images=n,
        scaling=args.scaling,
        workers=args.workers,
        codec="default",
        cpus=os.cpu_count(),
        load_avg=os.getloadavg(),
        results=results,
    )
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
