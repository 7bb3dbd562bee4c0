"""``mcnn-data``: build and inspect image stores.

mcnn-data bbbc021   --metadata DIR --images DIR --out STORE [--scaling plate|image|none] [--illumination]
mcnn-data bbbc021   --metadata DIR --images DIR --check      # which plate folders / files are missing
mcnn-data manifest  --index TABLE.csv --out STORE [--channels DNA,ER,RNA,AGP,Mito] [--label COLUMN]
mcnn-data ome-zarr  --plate PLATE.zarr --out STORE [--level 0] [--labels TABLE.csv]
mcnn-data folder    --images DIR --out STORE
mcnn-data synthetic --out DIR [--channels 3|5] [--images N] [--classes K] [--height H] [--width W] [--seed S]
                    [--store STORE]
mcnn-data montage   SRC --out DST --grid 2x2 [--order row|snake] [--skip-incomplete]   # one image per well
mcnn-data info      STORE
"""

# Each subcommand imports its importer inside its function: `mcnn-data X --help` and the other importers' heavy
# dependencies (TensorStore's zarr drivers, pandas) are not loaded for a command that does not use them.

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mcnn_jax.data.store import CODECS, DEFAULT_CODEC, StoreError


def _add_store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--codec",
        default=DEFAULT_CODEC,
        choices=sorted(CODECS),
        help=f"zarr v3 compression of the image chunks (default: {DEFAULT_CODEC}, the fastest to "
        f"decode among the compressors measured by benchmarks/bench_reader.py)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a complete store at --out")
    p.add_argument("--workers", type=int, default=2, help="threads reading and processing images (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _grid(text: str) -> tuple[int, int]:
    from mcnn_jax.data.montage import parse_grid

    try:
        return parse_grid(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _plane(text: str) -> tuple[str, int]:
    axis, _, k = text.partition("=")
    if axis.upper() not in ("Z", "T") or not k.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"--plane takes Z=K or T=K, got {text!r}")
    return axis.upper(), int(k)


def _intensity_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scaling",
        default="plate",
        choices=("plate", "image", "none"),
        help="per-channel robust intensity scaling: percentiles pooled per plate (default), per "
        "image, or none (values kept)",
    )
    p.add_argument(
        "--percentiles",
        type=float,
        nargs=2,
        default=(0.1, 99.9),
        metavar=("LOW", "HIGH"),
        help="the percentiles mapped to 0 and the dtype maximum (default 0.1 99.9)",
    )
    p.add_argument(
        "--illumination",
        action="store_true",
        help="divide out a smooth per-plate, per-channel illumination field (a heavily blurred "
        "mean image of the plate)",
    )
    p.add_argument(
        "--dtype", choices=("uint8", "uint16"), default=None, help="stored dtype (default: that of the images)"
    )


def _label_options(p: argparse.ArgumentParser, table_help: str) -> None:
    p.add_argument(
        "--label",
        default=None,
        help="the class column (default: the first of Metadata_Class, "
        "Metadata_MoA, Class, class, label, moa)" + table_help,
    )
    p.add_argument(
        "--drop-unlabelled",
        action="store_true",
        help="leave out fields without a class (default: an error naming them)",
    )
    p.add_argument(
        "--plane",
        type=_plane,
        action="append",
        default=[],
        metavar="AXIS=K",
        help="the plane of a Z stack or time series to import (e.g. --plane Z=3)",
    )
    p.add_argument(
        "--crop",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="keep the central H x W of every field (the M-CNN takes sides that are multiples of 128: "
        "--crop 1024 1024 for 1080x1080 Cell Painting fields)",
    )


def _importer(sub, name: str, source: str, source_help: str, **kw) -> argparse.ArgumentParser:
    """A sub-command reading ``source`` (a required path) into the store ``--out``."""
    p = sub.add_parser(name, **kw)
    p.add_argument(source, required=True, type=Path, help=source_help)
    p.add_argument("--out", required=True, type=Path, help="the store directory to write")
    return p


def _screen_parsers(sub) -> None:
    """The parsers of the manifest and OME-Zarr importers."""
    p = _importer(
        sub,
        "manifest",
        "--index",
        "the table (paths relative to its folder)",
        help="import a screen described by a table (one row per field)",
        description="Import the fields listed in a CSV (Metadata_Plate, Metadata_Well, Metadata_Site, "
        "other Metadata_* columns, one path column per channel, a label; CellProfiler "
        "LoadData CSVs work as they are): see mcnn_jax.data.manifest.",
    )
    p.add_argument(
        "--channels",
        type=lambda t: [c for c in t.split(",") if c],
        default=None,
        help="channel columns in store order, e.g. DNA,ER,RNA,AGP,Mito (a column X or FileName_X + "
        "PathName_X; default: the FileName_* columns, else every non-Metadata column)",
    )
    _label_options(p, "; with --label-table, comma-separated treatment columns looked up there")
    p.add_argument(
        "--label-table",
        type=Path,
        default=None,
        help="a second table mapping treatments to classes (e.g. BBBC021_v1_moa.csv)",
    )
    p.add_argument(
        "--table-keys",
        type=lambda t: t.split(","),
        default=None,
        help="its columns matching --label (default: the same names), e.g. compound,concentration",
    )
    p.add_argument("--table-class", default="class", help="its class column (default: class), e.g. moa")
    _intensity_options(p)
    _add_store_options(p)

    p = _importer(
        sub,
        "ome-zarr",
        "--plate",
        "the plate's zarr group (PLATE.zarr)",
        help="import an OME-Zarr HCS plate (NGFF 0.4 / zarr v2, 0.5 / zarr v3)",
        description="Import every field of an OME-Zarr plate; well and field names are kept.",
    )
    p.add_argument("--level", type=int, default=0, help="the resolution level (default 0: full resolution)")
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="a CSV with Metadata_Well and a class column (default: every field 'unlabelled')",
    )
    _label_options(p, "")
    _intensity_options(p)
    _add_store_options(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mcnn-data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="A store is complete only once its COMPLETE marker is written; rerun an "
        "interrupted import with the same arguments to finish it.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "bbbc021",
        help="import BBBC021 (Broad CSVs + plate folders of 16-bit TIFFs)",
        description="Import BBBC021 into a store: channels stacked DAPI, tubulin, actin; only "
        "images whose (compound, concentration) has a mechanism of action are kept.",
    )
    p.add_argument(
        "--metadata", required=True, type=Path, help="folder with BBBC021_v1_image.csv and BBBC021_v1_moa.csv"
    )
    p.add_argument(
        "--images",
        required=True,
        type=Path,
        help="folder holding the plate folders (Image_PathName_* is relative to it)",
    )
    p.add_argument("--out", type=Path, help="the store directory to write (required unless --check)")
    p.add_argument(
        "--check",
        action="store_true",
        help="only check the downloaded folder against the CSVs (which plate folders are present, "
        "which files are missing; no pixel is read) and exit 1 if the import would fail",
    )
    _intensity_options(p)
    _add_store_options(p)

    _screen_parsers(sub)

    p = _importer(
        sub,
        "folder",
        "--images",
        "folder with one sub-folder per class",
        help="import one sub-folder per class of TIFF / PNG / JPEG images",
        description="Import DIR/<class>/<image> into a store (pixel values kept).",
    )
    _add_store_options(p)

    p = sub.add_parser(
        "synthetic",
        help="generate a synthetic screen (BBBC021 layout or Cell Painting), import it",
        description="Write a deterministic synthetic high-content screen to --out (TIFFs + BBBC021 "
        "CSVs, or with --channels 5 TIFFs + manifest.csv); with --store, also import it.",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for the screen (plate folders + CSVs)")
    p.add_argument(
        "--channels",
        type=int,
        default=3,
        choices=(3, 5),
        help="3: DAPI / tubulin / actin in the BBBC021 layout (default); 5: Cell Painting (DNA, ER, RNA, "
        "AGP, Mito), one TIFF per channel and a manifest.csv",
    )
    p.add_argument("--images", type=int, default=240, help="number of images (fields) (default 240)")
    p.add_argument("--classes", type=int, default=8, help="number of classes incl. DMSO (default 8)")
    p.add_argument("--height", type=int, default=1024, help="field height in pixels (default 1024)")
    p.add_argument("--width", type=int, default=1280, help="field width in pixels (default 1280)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--compounds", type=int, default=3, help="compounds per mechanism (default 3)")
    p.add_argument("--concentrations", type=int, default=2, help="concentrations per compound (default 2)")
    p.add_argument(
        "--background",
        choices=("noisy", "offset", "flat"),
        default="noisy",
        help="camera background: noise everywhere (default), a flat offset with sparse noise, or "
        "exactly flat where there is no signal",
    )
    p.add_argument(
        "--saturation", type=int, default=0, help="full-well level in counts above which pixels clip (default 0 = off)"
    )
    p.add_argument(
        "--bits",
        type=int,
        choices=(16, 12, 8),
        default=16,
        help="camera bit depth; 8 writes an 8-bit export (uint8 TIFFs) (default 16)",
    )
    p.add_argument(
        "--store",
        type=Path,
        default=None,
        help="also import the screen into this store (per-plate scaling + illumination correction)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a complete store at --store")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "montage",
        help="stitch the sites of each well of a store into one image (a new store, one image per well)",
        description="Write the whole-well montage of a complete store: the sites of each (plate, well) stitched "
        "into one [rows*H, cols*W, C] image, site 1 top-left (see mcnn_jax.data.montage). Every well must have "
        "all rows*cols sites.",
    )
    p.add_argument(
        "source", type=Path, metavar="SRC", help="the store of the fields (with plate, well and site metadata)"
    )
    p.add_argument("--out", required=True, type=Path, help="the store directory to write")
    p.add_argument(
        "--grid", required=True, type=_grid, metavar="RxC", help="rows x columns of sites in a well, e.g. 2x2 or 3x3"
    )
    p.add_argument(
        "--order",
        choices=("row", "snake"),
        default="row",
        help="row: site 1 top-left, then left to right, row by row (default); snake: the second, fourth, ... "
        "rows right to left, as a microscope's serpentine scan",
    )
    p.add_argument(
        "--skip-incomplete",
        action="store_true",
        help="leave out wells that lack sites (counted in a warning; default: an error naming them)",
    )
    p.add_argument(
        "--codec", default=None, choices=sorted(CODECS), help="compression of the images (default: the source's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a complete store at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "info", help="describe a store", description="Print a store's images per class, size, dtype and compounds."
    )
    p.add_argument("store", type=Path)
    return ap


def describe(path) -> str:
    from mcnn_jax.data.store import open_store

    s = open_store(path)
    h, w, c = s.image_shape
    lines = [
        f"store       {s.path}",
        f"images      {s.num_images} of {h}x{w}x{c} {s.dtype.name} (channels: {', '.join(s.channels)})",
        f"size        {s.nbytes / 2**30:.3f} GiB raw, {s.disk_bytes() / 2**30:.3f} GiB on disk "
        f"(codec {s.info.get('codec')})",
        f"source      {s.info.get('source', '?')}"
        + (
            f", scaling {s.info['scaling']}, illumination correction {s.info['illumination']}"
            if "scaling" in s.info
            else ""
        ),
    ]
    if "montage" in s.info:
        m = s.info["montage"]
        skipped = [f"{plate} {well}" for plate, well in m.get("skipped_wells", [])]
        lines.append(
            f"montage     {m['grid'][0]}x{m['grid'][1]} sites a well ({m['order']} order) of {m['source']}"
            + (
                f"; {len(skipped)} incomplete well(s) left out: {', '.join(skipped[:5])}"
                + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
                if skipped
                else ""
            )
        )
    lines.append(f"classes     {len(s.class_names)}")
    width = max(len(n) for n in s.class_names)
    comp = s.metadata.get("compound", [""] * s.num_images)
    for name, n in s.class_counts().items():
        cs = sorted({comp[i] for i in range(s.num_images) if s.labels[i] == s.class_names.index(name)} - {""})
        lines.append(f"  {name:<{width}}  {n:6d} images" + (f"  ({', '.join(cs)})" if cs else ""))
    compounds = s.compounds
    lines.append(f"compounds   {len(compounds)}" + (f": {', '.join(compounds)}" if compounds else ""))
    return "\n".join(lines)


def _intensity(args) -> dict:
    return dict(
        scaling=args.scaling, percentiles=tuple(args.percentiles), illumination=args.illumination, dtype=args.dtype
    )


def _store(args) -> dict:
    return dict(codec=args.codec, overwrite=args.overwrite, workers=args.workers, progress=not args.quiet)


def _bbbc021(args):
    from mcnn_jax.data.bbbc021 import check_folder, import_bbbc021

    if args.check:
        report = check_folder(args.metadata, args.images)
        print(report.summary())
        return 0 if report.ok else 1
    if args.out is None:
        raise ValueError("bbbc021: --out STORE is required (or --check to only check the folder)")
    return import_bbbc021(args.metadata, args.images, args.out, **_intensity(args), **_store(args))


def _manifest(args):
    from mcnn_jax.data.manifest import import_manifest

    return import_manifest(
        args.index,
        args.out,
        channels=args.channels,
        label=args.label,
        label_table=args.label_table,
        table_keys=args.table_keys,
        table_class=args.table_class,
        drop_unlabelled=args.drop_unlabelled,
        planes=dict(args.plane),
        crop=args.crop,
        **_intensity(args),
        **_store(args),
    )


def _ome_zarr(args):
    from mcnn_jax.data.omezarr import import_ome_zarr

    return import_ome_zarr(
        args.plate,
        args.out,
        level=args.level,
        labels=args.labels,
        label=args.label,
        drop_unlabelled=args.drop_unlabelled,
        planes=dict(args.plane),
        crop=args.crop,
        **_intensity(args),
        **_store(args),
    )


def _folder(args):
    from mcnn_jax.data.folder import import_folder

    return import_folder(args.images, args.out, **_store(args))


def _montage(args):
    from mcnn_jax.data.montage import montage_store

    return montage_store(
        args.source,
        args.out,
        args.grid,
        args.order,
        args.skip_incomplete,
        codec=args.codec,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )


def _synthetic(args):
    t0 = time.perf_counter()
    common = (
        args.out,
        args.images,
        args.classes,
        args.height,
        args.width,
        args.seed,
        args.compounds,
        args.concentrations,
    )
    from mcnn_jax.data.synthetic import Camera, generate_screen

    camera = Camera(args.background, args.saturation, args.bits)
    if args.channels == 5:
        if camera.realistic:
            raise ValueError("--background, --saturation and --bits apply to the 3-channel screen only")
        from mcnn_jax.data.cellpainting import generate_cellpainting_screen

        raw = generate_cellpainting_screen(*common, progress=not args.quiet)
    else:
        raw = generate_screen(*common, progress=not args.quiet, camera=camera)
    print(
        f"synthetic screen: {args.images} images of {args.height}x{args.width}x{args.channels} in {raw} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    if args.store is None:
        return 0
    options = dict(
        scaling="plate",
        illumination=not camera.realistic,  # keeps a flat background flat
        dtype="uint16",
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if args.channels == 5:
        from mcnn_jax.data.manifest import import_manifest

        return import_manifest(raw, args.store, label="Metadata_MoA", **options)
    from mcnn_jax.data.bbbc021 import import_bbbc021

    return import_bbbc021(raw, raw, args.store, **options)


COMMANDS = {
    "bbbc021": _bbbc021,
    "manifest": _manifest,
    "ome-zarr": _ome_zarr,
    "folder": _folder,
    "synthetic": _synthetic,
    "montage": _montage,
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.command == "info":
            print(describe(args.store))
            return 0
        out = COMMANDS[args.command](args)
        if isinstance(out, int):  # a check, or a screen generated without --store
            return out
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s\n")
        print(describe(out))
        return 0
    except (StoreError, ValueError, FileNotFoundError) as e:
        print(f"mcnn-data: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mcnn-data: interrupted; rerun the same command to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
