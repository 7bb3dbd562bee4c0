"""Microscopy-like test fields: what users feed the model, not uniform noise.

Real fields have a flat dark background (a camera offset with sparse quantised noise, or exactly constant after
background subtraction), saturated bright objects, 8- or 12-bit quantisation, large all-zero borders
(stitched or registered fields) and sometimes a constant channel. There, a convolution's output is constant over
whole regions, so max-pool windows hold many equal maxima and exact zeros are everywhere. Every equivalence test
of a faster form runs on ``KINDS`` as well as on random inputs (``"random"``).
"""

from __future__ import annotations

import numpy as np

KINDS = ("flat_saturated", "offset_12bit", "8bit_zero_border", "constant_channel", "random")


def _discs(rng, h, w, count, rmin, rmax):
    """A boolean mask of ``count`` filled discs."""
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), bool)
    for _ in range(count):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        r = rng.integers(rmin, rmax + 1)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    return mask


def field(kind: str, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    """One float32 [h, w, c] field in [0, 1] of the given kind."""
    rng = np.random.default_rng(seed)
    scale = max(1, min(h, w) // 64)
    objects = [_discs(rng, h, w, 6 + 2 * scale, 2 * scale, 6 * scale) for _ in range(c)]
    if kind == "random":
        return rng.random((h, w, c), np.float32)
    if kind == "flat_saturated":  # constant background 0.1, saturated objects at exactly 1.0
        x = np.full((h, w, c), 0.1, np.float32)
        for ch, m in enumerate(objects):
            x[m, ch] = 1.0
        return x
    if kind == "offset_12bit":  # camera offset 100/4095 with noise on 3% of pixels, objects, 12-bit, clipped
        x = np.full((h, w, c), 100.0)
        sparse = rng.random((h, w, c)) < 0.03
        x[sparse] += rng.integers(1, 8, sparse.sum())
        for ch, m in enumerate(objects):
            x[m, ch] += 6000 if ch == 0 else rng.uniform(800, 3000)  # channel 0's objects saturate at 4095
        return (np.clip(np.rint(x), 0, 4095) / 4095).astype(np.float32)
    if kind == "8bit_zero_border":  # an 8-bit export of a registered field: a wide all-zero border
        x = np.zeros((h, w, c))
        for ch, m in enumerate(objects):
            x[m, ch] = rng.integers(120, 256)
        x += (rng.random((h, w, c)) < 0.02) * rng.integers(1, 4, (h, w, c))
        bh, bw = h // 4, w // 5
        x[:bh], x[:, -bw:] = 0, 0
        return (np.clip(x, 0, 255).astype(np.uint8) / 255).astype(np.float32)
    if kind == "constant_channel":  # flat saturated field whose last channel is one constant
        x = field("flat_saturated", h, w, c, seed)
        x[..., -1] = 0.25
        return x
    raise ValueError(f"unknown field kind {kind!r}; kinds: {KINDS}")


def fields(kind: str, n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    """A batch [n, h, w, c] of fields of one kind (seeds seed, seed + 1, ...)."""
    return np.stack([field(kind, h, w, c, seed + i) for i in range(n)])
