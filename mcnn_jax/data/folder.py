"""Import a folder of class sub-folders (``DIR/<class>/<image>``, TIFF / PNG / JPEG) into an image store.

Classes are the sub-folder names, sorted. Every image must have the same height, width, channel count and
dtype (uint8 or uint16); a 2-D image is one channel, a multi-channel TIFF is read by its axes
(``mcnn_jax.data.images``: CYX, YXC, multi-page). Pixel values are stored unchanged. The metadata has the
class, the file (relative to DIR) and an empty compound (so leave-one-compound-out does not apply). An empty
class folder, an unreadable image or a mismatched one is an ImportDataError naming the path.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mcnn_jax.data._util import progress as progress_bar
from mcnn_jax.data.images import read_image
from mcnn_jax.data.store import DEFAULT_CODEC, ImportDataError, StoreWriter

EXTENSIONS = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}


def list_images(images_dir) -> tuple[list[str], list[tuple[Path, int]]]:
    """Returns (class names, [(file, label)]); checks that there are classes and none is empty."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ImportDataError(f"image folder {images_dir} does not exist")
    classes = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ImportDataError(f"{images_dir} has no class sub-folders (expected {images_dir}/<class>/<image>)")
    files = []
    for k, c in enumerate(classes):
        found = sorted(
            p
            for p in (images_dir / c).rglob("*")
            if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
        )
        if not found:
            raise ImportDataError(f"class folder {images_dir / c} is empty: it has no TIFF / PNG / JPEG images")
        files += [(p, k) for p in found]
    return classes, files


def import_folder(
    images_dir, out, *, codec: str = DEFAULT_CODEC, overwrite: bool = False, workers: int = 2, progress: bool = True
) -> Path:
    """Imports ``images_dir`` (one sub-folder per class) into the store ``out``; returns its path."""
    images_dir, out = Path(images_dir), Path(out)
    classes, files = list_images(images_dir)
    first = read_image(files[0][0])
    digest = hashlib.sha256("\n".join(f"{p}|{k}|{p.stat().st_size}" for p, k in files).encode()).hexdigest()
    writer = StoreWriter(
        out, len(files), first.shape, first.dtype.name, codec, dict(kind="folder", files=digest), overwrite
    )

    def load(i):
        a = read_image(files[i][0])
        if a.shape != first.shape or a.dtype != first.dtype:
            raise ImportDataError(
                f"{files[i][0]} is {a.shape} {a.dtype}; the first image ({files[0][0]}) is "
                f"{first.shape} {first.dtype}: all images must match"
            )
        return i, a

    todo = [i for i in range(len(files)) if not writer.done(i)]
    it = ThreadPoolExecutor(max(1, workers))
    try:
        results = it.map(load, todo)
        results = progress_bar(results, len(todo), f"import: writing {out.name}", progress)
        for i, a in results:
            writer.write(i, a)
    finally:
        it.shutdown(cancel_futures=True)
        writer.drain()
    rel = [str(p.relative_to(images_dir)) for p, _ in files]
    metadata = {
        "class": [classes[k] for _, k in files],
        "compound": [""] * len(files),
        "concentration": [0.0] * len(files),
        "plate": [""] * len(files),
        "well": [""] * len(files),
        "site": [0] * len(files),
        "file": rel,
    }
    channels = [f"c{i}" for i in range(first.shape[2])]
    return writer.finish(
        [k for _, k in files], classes, metadata, channels, dict(source="folder", images_dir=str(images_dir.resolve()))
    )
