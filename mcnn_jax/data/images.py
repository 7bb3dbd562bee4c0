"""Reading one image file into [H, W, C] by its axes, as tifffile (or an OME-Zarr image's metadata) names them.

Axes are letters: ``Y`` and ``X`` (required), a channel axis ``C`` or ``S`` (samples, e.g. RGB or a
contiguous multi-channel TIFF), ``Z`` / ``T`` (a plane is chosen with ``planes={"Z": k}``), and ``Q`` / ``I``
(tifffile's names for the pages of a multi-page TIFF without axis metadata), which are taken as channels
when they are the only non-spatial axis. Axes of length 1 are dropped first. So a CYX OME-TIFF, a YXC (YXS)
TIFF, a multi-page TIFF of single-channel planes and a ZCYX stack with a chosen Z plane all give [H, W, C].
Anything else (two channel axes, a Z stack without a chosen plane, an unknown axis) is an ImportDataError
naming the file and the axes found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from mcnn_jax.data.store import ImportDataError

CHANNEL_AXES = "CS"  # named channel axes
PAGE_AXES = "QI"  # unnamed page / sequence axes: channels only when nothing else is left
PLANE_AXES = "ZT"  # chosen by index
DTYPES = (np.uint8, np.uint16)


def to_yxc(a: np.ndarray, axes: str, where: str, planes: Mapping[str, int] | None = None) -> np.ndarray:
    """Rearranges ``a`` (axes named by ``axes``) into [H, W, C]; see the module docstring."""
    axes = found = axes.upper()
    if len(axes) != a.ndim:
        raise ImportDataError(f"{where}: {a.ndim}-D data but {len(axes)} axis names {axes!r}")
    planes = {k.upper(): int(v) for k, v in (planes or {}).items()}
    for ax, k in planes.items():  # choose the requested planes (only where the axis exists)
        if ax in axes:
            n = a.shape[axes.index(ax)]
            if not 0 <= k < n:
                raise ImportDataError(f"{where}: plane {ax}={k} is outside the {n} planes of axes {axes}")
            a, axes = np.take(a, k, axis=axes.index(ax)), axes.replace(ax, "")
    keep = [i for i, n in enumerate(a.shape) if n > 1 or axes[i] in "YX"]
    a = a.reshape([a.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if "Y" not in axes or "X" not in axes:
        raise ImportDataError(f"{where}: no Y and X axes (axes {found}, shape {a.shape})")
    rest = axes.replace("Y", "").replace("X", "")
    for ax in rest:
        if ax in PLANE_AXES:
            raise ImportDataError(
                f"{where}: axes {found} have {a.shape[axes.index(ax)]} {ax} planes; choose one "
                f"(planes={{'{ax}': k}}, --plane {ax}=k)"
            )
    channel = [ax for ax in rest if ax in CHANNEL_AXES] or [ax for ax in rest if ax in PAGE_AXES]
    if len(rest) > 1 or (rest and not channel):
        raise ImportDataError(
            f"{where}: cannot resolve axes {found} (shape after dropping length-1 axes "
            f"{a.shape}) to Y, X and one channel axis"
        )
    order = [axes.index("Y"), axes.index("X")] + [axes.index(ax) for ax in channel]
    a = np.transpose(a, order)
    return a if a.ndim == 3 else a[..., None]


def center_crop(a: np.ndarray, size, where: str) -> np.ndarray:
    """The central ``size`` = (h, w) of an [H, W, C] image (``a`` itself when ``size`` is None), e.g. 1024x1024
    of a 1080x1080 Cell Painting field, as the M-CNN takes sides that are multiples of 128."""
    if size is None:
        return a
    h, w = int(size[0]), int(size[1])
    if a.shape[0] < h or a.shape[1] < w:
        raise ImportDataError(f"{where} is {a.shape[0]}x{a.shape[1]}, smaller than the crop {h}x{w}")
    y0, x0 = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    return a[y0 : y0 + h, x0 : x0 + w]


def check_dtype(a: np.ndarray, where: str) -> np.ndarray:
    if a.dtype not in DTYPES:
        raise ImportDataError(f"{where}: dtype {a.dtype}; only uint8 and uint16 images are supported")
    return a


def read_tiff(path: Path, planes: Mapping[str, int] | None = None, where: str | None = None) -> np.ndarray:
    """Reads the first series of a TIFF / OME-TIFF -> [H, W, C] by the axes tifffile reports."""
    import tifffile

    where = where or str(path)
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            axes, a = series.axes, series.asarray()
    except Exception as e:  # noqa: BLE001 - tifffile raises many kinds for a damaged file
        raise ImportDataError(f"cannot read TIFF {where}: {type(e).__name__}: {e}") from None
    if a.size == 0:
        raise ImportDataError(f"cannot read TIFF {where}: no image data (a corrupt or truncated file)")
    return check_dtype(to_yxc(a, axes, where, planes), where)


def read_image(path, planes: Mapping[str, int] | None = None, where: str | None = None) -> np.ndarray:
    """Reads a TIFF (by its axes), PNG or JPEG -> [H, W, C] uint8 / uint16; errors name the file (``where``)."""
    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        raise ImportDataError(f"missing image {where}")
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_tiff(path, planes, where)
    try:
        from PIL import Image

        with Image.open(path) as im:
            a = np.asarray(im)
    except Exception as e:  # noqa: BLE001
        raise ImportDataError(f"cannot read image {where}: {type(e).__name__}: {e}") from None
    return check_dtype(to_yxc(a, "YXS"[: a.ndim], where), where)
