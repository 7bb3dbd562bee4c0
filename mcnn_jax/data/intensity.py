"""Intensity processing at import time: illumination correction and robust per-channel scaling.

Illumination correction (optional, per plate and channel): the mean of all the plate's images is reduced to a
coarse grid (about 64 cells along the shorter side), blurred with a wide Gaussian (sigma = 1/8 of the coarse
grid's shorter side) and normalised to mean 1; it is stored small and bilinearly expanded to full size, and
every image of the plate is divided by it.

Scaling (per channel): the values at the low / high percentiles (default 0.1 / 99.9) map to 0 / the output
dtype's maximum, linearly, clipped. ``plate``: the percentiles pool every 4th pixel (in y and x) of all the
plate's (illumination-corrected) images, so intensity differences between treatments on a plate survive;
``image``: each image's own percentiles; ``none``: values are kept (only rounded and clipped to the dtype).
"""

from __future__ import annotations

import numpy as np

SCALINGS = ("plate", "image", "none")
SUBSAMPLE = 4  # pixel stride of the samples used for plate percentiles


def _gauss1d(x: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="reflect" if x.shape[axis] > r else "edge")
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), axis, xp)


def illumination_field_small(mean_image: np.ndarray) -> np.ndarray:
    """A smooth, mean-1 illumination field [h, w, C] (coarse grid) estimated from a mean image [H, W, C]."""
    H, W, C = mean_image.shape
    f = max(1, min(H, W) // 64)
    h, w = H // f, W // f
    small = mean_image[: h * f, : w * f].reshape(h, f, w, f, C).mean(axis=(1, 3))
    sigma = max(1.0, min(h, w) / 8)
    small = _gauss1d(_gauss1d(small, sigma, 0), sigma, 1)
    small = np.maximum(small, 1e-6)
    small /= small.mean(axis=(0, 1), keepdims=True)
    return np.maximum(small, 0.05).astype(np.float32)


def expand_field(small: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear expansion of a coarse field [h, w, C] to [height, width, C] (cell centres aligned)."""
    h, w, C = small.shape
    ys = np.clip((np.arange(height) + 0.5) * h / height - 0.5, 0, h - 1)
    xs = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = small[y0][:, x0] * (1 - fx) + small[y0][:, x1] * fx
    bot = small[y1][:, x0] * (1 - fx) + small[y1][:, x1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def robust_range(samples: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) percentiles of samples [..., C]; high is kept above low."""
    flat = samples.reshape(-1, samples.shape[-1]).astype(np.float32)
    lo = np.percentile(flat, low, axis=0)
    hi = np.percentile(flat, high, axis=0)
    hi = np.maximum(hi, lo + 1e-3)
    return lo.astype(np.float32), hi.astype(np.float32)


def scale(image: np.ndarray, lo, hi, dtype) -> np.ndarray:
    """Maps [lo, hi] per channel linearly onto the full range of ``dtype`` (clipped, rounded)."""
    top = np.iinfo(dtype).max
    x = (image.astype(np.float32) - np.asarray(lo, np.float32)) * (
        top / (np.asarray(hi, np.float32) - np.asarray(lo, np.float32))
    )
    return np.clip(np.rint(x), 0, top).astype(dtype)


def process(image: np.ndarray, field: np.ndarray | None, scaling: str, lo, hi, dtype, percentiles) -> np.ndarray:
    """Applies illumination correction (if ``field``) and the scaling to one [H, W, C] image."""
    x = image.astype(np.float32)
    if field is not None:
        x /= field
    if scaling == "plate":
        return scale(x, lo, hi, dtype)
    if scaling == "image":
        lo, hi = robust_range(x[::2, ::2], *percentiles)
        return scale(x, lo, hi, dtype)
    return np.clip(np.rint(x), 0, np.iinfo(dtype).max).astype(dtype)
