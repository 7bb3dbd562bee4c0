"""Exact streaming: a branch's convolutions computed tile by tile, so memory is bounded by a tile, not the image.

A streamed branch max-pools the whole image as usual, then runs its convolutions on one tile of the pooled
image at a time (a ``lax.scan`` over tiles whose body is rematerialised, so the backward pass recomputes one
tile at a time and only the pooled image is kept for it). Each tile is read with a halo as wide as the
receptive field of the branch's convolutions (``convs x (kernel // 2)`` pooled pixels), which each convolution
consumes by ``kernel // 2`` (its output's outer ring is cut); after every convolution the pixels outside the field
are set to zero, which is the zero padding that 'SAME' gives at the field's real border, so no bias + ReLU leaks
into an inner tile. Tiles are aligned to the branch's post-pool
(the common pooling D in input pixels), so no pool window crosses a tile edge and ties resolve as on the
whole image; the last tile of a row or column is shifted back to end at the border (its cells already
computed by the previous tile are taken from that tile). The result does not depend on the tile size.

``check_stream`` checks a tile against a field; ``streamed_branch`` is the branch, with ``mcnn.Branch``'s
parameters.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from mcnn_jax.model.layers import Conv, max_pool


def check_stream(tile: int, height: int, width: int, total_pool: int, norm: str = "none") -> None:
    """Raises ValueError (naming ``model.stream_tile``) unless ``tile`` can stream a ``height`` x ``width`` field."""
    if tile < 0 or tile % total_pool:
        raise ValueError(
            f"model.stream_tile must be 0 (off) or a positive multiple of the branches' common pooling "
            f"{total_pool}, so that no pool window crosses a tile edge; got {tile}"
        )
    if tile > min(height, width):
        raise ValueError(
            f"model.stream_tile {tile} is larger than the {height}x{width} field: use at most "
            f"{min(height, width) // total_pool * total_pool}, or 0 to switch streaming off"
        )
    if norm != "none":
        raise ValueError(
            f"model.stream_tile needs model.norm='none': {norm!r} normalisation takes statistics over the whole "
            f"field, which one tile does not see"
        )


def tile_starts(size: int, tile: int) -> np.ndarray:
    """Start of each tile along one axis: 0, tile, 2 tile, ..., the last one shifted to end at ``size``."""
    n = math.ceil(size / tile)
    return np.minimum(np.arange(n) * tile, size - tile)


def cell_source(size: int, tile: int, post_pool: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output cell along one axis (``size // post_pool`` cells): the tile that provides it and the
    cell's index within that tile's output. A cell covered by two tiles is taken from the earlier one."""
    starts = tile_starts(size, tile) // post_pool
    cells = np.arange(size // post_pool)
    which = np.minimum(cells // (tile // post_pool), len(starts) - 1)
    return which, cells - starts[which]


def halo_overhead(model, height: int, width: int, channels: int = 3) -> float:
    """The convolution FLOPs that ``model`` (an ``MCNN`` with ``stream_tile``) computes on a ``height`` x
    ``width`` field, over the unstreamed model's: each tile's convolutions also run on its halo (and a shifted last
    tile on the cells it shares with the previous one)."""
    p = model.kernel_size // 2
    halo = model.convs_per_branch * p
    nominal = streamed = 0
    for k, (f, w, on) in enumerate(zip(model.pool_factors, model.widths, model.streamed_branches())):
        h_, w_ = height // f, width // f
        t = model.stream_tile // f
        tiles = len(tile_starts(h_, t)) * len(tile_starts(w_, t)) if on else 0
        for j in range(model.convs_per_branch):
            per_pixel = (channels if j == 0 else w) * w
            nominal += per_pixel * h_ * w_
            # streamed, conv j runs on the tile and what is left of the halo before it: halo - j p on each side
            streamed += per_pixel * (tiles * (t + 2 * (halo - j * p)) ** 2 if on else h_ * w_)
    return streamed / nominal


class _Tile(nn.Module):
    """One tile of a streamed branch: its convolutions on the tile and halo, masked to the field, cropped to
    the tile and post-pooled. Called by ``lax.scan`` (through ``nn.scan``) with a tile's start."""

    width: int
    num_convs: int
    kernel_size: int
    tile: int  # in pooled pixels
    post_pool: int
    shape: tuple[int, int]  # the pooled field (h, w)
    dtype: Any = jnp.float32
    impl: str = "native"

    @nn.compact
    def __call__(self, carry, start, field):
        halo = self.num_convs * (self.kernel_size // 2)
        size = self.tile + 2 * halo
        # the tile and its halo, gathered from the field (no padded copy of the field): rows and columns outside
        # the field are read at the border and zeroed by the mask, as every layer's input is outside the field
        rows = start[0] - halo + lax.iota(jnp.int32, size)
        cols = start[1] - halo + lax.iota(jnp.int32, size)
        x = jnp.take(field, jnp.clip(rows, 0, self.shape[0] - 1), axis=1)
        x = jnp.take(x, jnp.clip(cols, 0, self.shape[1] - 1), axis=2)
        inside = ((rows >= 0) & (rows < self.shape[0]))[:, None] & ((cols >= 0) & (cols < self.shape[1]))[None, :]
        mask = inside.astype(self.dtype)[None, :, :, None]
        x = x * mask.astype(x.dtype)
        p = self.kernel_size // 2
        for j in range(self.num_convs):
            x = Conv(self.width, self.kernel_size, dtype=self.dtype, impl=self.impl, relu=True, name=f"conv{j}")(x)
            # exact only p pixels in from the block's edge (beyond, 'SAME' padded the block, not the field): the
            # ring is cut, so each layer computes on the block its successors need (the halo shrinks by p a layer)
            r = (j + 1) * p
            x = x[:, p : x.shape[1] - p, p : x.shape[2] - p] * mask[:, r : size - r, r : size - r]
        return carry, max_pool(x, self.post_pool, self.impl)


def streamed_branch(
    x,
    *,
    name: str,
    pool: int,
    width: int,
    post_pool: int,
    tile: int,
    num_convs: int = 3,
    kernel_size: int = 5,
    dtype: Any = jnp.float32,
    impl: str = "native",
):
    """``mcnn.Branch`` (without normalisation) computed tile by tile: the same function, with the same
    parameters (``<name>/conv0`` ..). Call it inside a Flax module's compact method, where the branch's
    submodule ``name`` is created. ``tile`` is in input pixels (a multiple of ``pool x post_pool``, at most the
    field's height and width)."""
    x = max_pool(x, pool, impl)
    h, w = x.shape[1], x.shape[2]
    t = tile // pool
    rows, cols = tile_starts(h, t), tile_starts(w, t)
    starts = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2).astype(np.int32)
    tiles = nn.scan(
        nn.remat(_Tile, prevent_cse=False),  # the backward pass recomputes one tile at a time
        variable_broadcast="params",
        split_rngs={"params": False},
        in_axes=(0, nn.broadcast),
    )(width, num_convs, kernel_size, t, post_pool, (h, w), dtype, impl, name=name)
    _, out = tiles((), jnp.asarray(starts), x)  # [tiles, N, t / post_pool, t / post_pool, width]
    out = out.reshape(len(rows), len(cols), *out.shape[1:])
    ti, ri = cell_source(h, t, post_pool)
    tj, cj = cell_source(w, t, post_pool)
    # each output cell (r, c) from its tile: out[ti[r], tj[c], :, ri[r], cj[c]] is [h', w', N, width]
    cells = out[ti[:, None], tj[None, :], :, ri[:, None], cj[None, :]]
    return cells.transpose(2, 0, 1, 3)
