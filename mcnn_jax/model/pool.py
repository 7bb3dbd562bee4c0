"""Max-pooling by f (kernel = stride = f, no padding) with the same value and gradient as XLA's ``reduce_window``
max-pool (``flax.linen.max_pool``), and a cheaper gradient.

XLA's max-pool gradient is a select-and-scatter over the input. Here the forward pass finds each window's
maximum and then the position of its first occurrence, and the backward pass is one elementwise pass that reads
only those positions and the output gradient (never the input).

Ties are the rule on microscopy fields, not the exception: a flat background, a saturated object or an
all-zero border makes a convolution's output constant over whole regions, so one window can hold thousands
of equal maxima. The gradient goes to exactly one of them (the first in row-major order, as XLA chooses), so
the gradients over each window sum to the output gradient (tests/test_realistic_fields.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _window_index(shape, f: int):
    """Row-major position (i * f + j) of each element of [n, h/f, f, w/f, f, c] windows within its window."""
    return lax.broadcasted_iota(jnp.int32, shape, 2) * f + lax.broadcasted_iota(jnp.int32, shape, 4)


def _windows(x, f: int):
    n, h, w, c = x.shape
    return x.reshape(n, h // f, f, w // f, f, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fast_max_pool(x, f: int):
    """Max-pool NHWC by f (kernel = stride = f, no padding; H and W multiples of f). The gradient goes to the
    first maximum (row-major) of each window, whose index the forward pass records (see the module doc); an
    input that is not differentiated (the image) costs one plain max-reduction."""
    return x if f == 1 else _windows(x, f).max(axis=(2, 4))


def _max_pool_fwd(x, f):
    if f == 1:
        return x, None
    xs = _windows(x, f)
    y = xs.max(axis=(2, 4))
    # the first position of each window's maximum: a second single-operand reduction, which XLA:CPU
    # vectorises (a variadic (value, index) reduction measured slower: benchmarks/README.md); a window whose
    # maximum is NaN has no such position (f * f) and passes no gradient
    first = jnp.where(xs == y[:, :, None, :, None, :], _window_index(xs.shape, f), f * f).min(axis=(2, 4))
    return y, first.astype(jnp.uint16 if f * f < 2**16 else jnp.int32)  # the index, small


def _max_pool_bwd(f, arg, ct):
    if f == 1:
        return (ct,)
    n, ho, wo, c = ct.shape
    shape = (n, ho, f, wo, f, c)
    won = _window_index(shape, f) == arg.astype(jnp.int32)[:, :, None, :, None, :]
    return (jnp.where(won, ct[:, :, None, :, None, :], 0).astype(ct.dtype).reshape(n, ho * f, wo * f, c),)


fast_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
