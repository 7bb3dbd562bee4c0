"""The import pipeline every screen importer shares (BBBC021, a manifest table, an OME-Zarr plate).

``write_images(writer, plates, load, ...)``: image ``i`` comes from ``load(i)`` ([H, W, C], uint8 / uint16) and
belongs to plate ``plates[i]``. Pass 1 (only with per-plate scaling or illumination correction) reads every
image of a plate once for its statistics (``mcnn_jax.data.intensity``) and saves them in the store folder
(``illumination.npz``), so a resumed import does not redo it; pass 2 processes and writes the images the store
does not have yet. Any number of channels: all statistics are per channel.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from mcnn_jax.data import intensity
from mcnn_jax.data._util import progress as progress_bar
from mcnn_jax.data._util import progress_counter
from mcnn_jax.data.store import StoreWriter

STATS_FILE = "illumination.npz"


def plate_statistics(
    plates: Sequence[str],
    load: Callable[[int], np.ndarray],
    shape,
    *,
    scaling: str,
    illumination: bool,
    percentiles,
    workers: int = 2,
    progress: bool = True,
):
    """Per plate: the coarse illumination field (if ``illumination``) and the per-channel robust range (if
    ``scaling == "plate"``); returns (fields, ranges), dicts keyed by plate."""
    fields: dict[str, np.ndarray] = {}
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    by_plate: dict[str, list[int]] = {p: [] for p in sorted(set(plates))}
    for i, p in enumerate(plates):
        by_plate[p].append(i)
    bar = progress_counter(len(plates), "import: plate statistics") if progress else None
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for p, members in by_plate.items():
            total = np.zeros(shape, np.float64)
            samples = []
            for img in pool.map(load, members):
                total += img
                samples.append(img[:: intensity.SUBSAMPLE, :: intensity.SUBSAMPLE])
                if bar is not None:
                    bar.update(1)
            samples = np.stack(samples).astype(np.float32)
            if illumination:
                fields[p] = intensity.illumination_field_small(total / len(members))
                full = intensity.expand_field(fields[p], *shape[:2])
                samples /= full[:: intensity.SUBSAMPLE, :: intensity.SUBSAMPLE]
            if scaling == "plate":
                ranges[p] = intensity.robust_range(samples, *percentiles)
    if bar is not None:
        bar.close()
    return fields, ranges


def _stats(writer: StoreWriter, plates, load, shape, scaling, illumination, percentiles, workers, progress):
    """``plate_statistics``, saved in the store folder and reloaded when the import resumes."""
    names = sorted(set(plates))
    path = writer.path / STATS_FILE
    if writer.resumed and path.is_file():
        z = np.load(path)
        fields = {p: z["fields"][i] for i, p in enumerate(names)} if illumination else {}
        ranges = {p: (z["lo"][i], z["hi"][i]) for i, p in enumerate(names)} if scaling == "plate" else {}
        return fields, ranges
    fields, ranges = plate_statistics(
        plates,
        load,
        shape,
        scaling=scaling,
        illumination=illumination,
        percentiles=percentiles,
        workers=workers,
        progress=progress,
    )
    empty = np.zeros(0)
    np.savez(
        path,
        plates=np.array(names),
        fields=np.stack([fields[p] for p in names]) if illumination else empty,
        lo=np.stack([ranges[p][0] for p in names]) if scaling == "plate" else empty,
        hi=np.stack([ranges[p][1] for p in names]) if scaling == "plate" else empty,
    )
    return fields, ranges


def write_images(
    writer: StoreWriter,
    plates: Sequence[str],
    load: Callable[[int], np.ndarray],
    *,
    scaling: str = "plate",
    illumination: bool = False,
    percentiles=(0.1, 99.9),
    workers: int = 2,
    progress: bool = True,
) -> None:
    """Processes (illumination correction, scaling to the store's dtype) and writes every image the store does
    not have yet; see the module docstring. Errors of ``load`` propagate (the store stays incomplete)."""
    if scaling not in intensity.SCALINGS:
        raise ValueError(f"scaling must be one of {intensity.SCALINGS}, got {scaling!r}")
    shape, out_dtype = writer.image_shape, np.dtype(writer.dtype)
    fields_small, ranges = {}, {}
    if scaling == "plate" or illumination:
        fields_small, ranges = _stats(
            writer, plates, load, shape, scaling, illumination, percentiles, workers, progress
        )
    full_fields: dict[str, np.ndarray] = {}

    def work(i):
        p, field = plates[i], None
        if illumination:
            if p not in full_fields:
                full_fields[p] = intensity.expand_field(fields_small[p], *shape[:2])
            field = full_fields[p]
        lo, hi = ranges.get(p, (None, None))
        return i, intensity.process(load(i), field, scaling, lo, hi, out_dtype, percentiles)

    todo = [i for i in range(len(plates)) if not writer.done(i)]
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for i, img in progress_bar(pool.map(work, todo), len(todo), f"import: writing {writer.path.name}", progress):
            writer.write(i, img)
    finally:
        pool.shutdown(cancel_futures=True)
        writer.drain()
