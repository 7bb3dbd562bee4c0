"""The XLA forms of the M-CNN's stride-1 'SAME' convolution: the SAME function and parameters, two ways.

- ``conv_xla``: XLA's convolution and its own gradients (``MCNN(impl="xla")``, the plain form).
- ``conv_fast``: XLA's convolution for the forward pass and the input gradient, and the kernel gradient as
  chunked matmuls (``kernel_grad``), which XLA:CPU runs far faster than its transposed convolution on thin
  layers (``MCNN(impl="fast")``; benchmarks/README.md has the measured speeds):

    dk[dy, dx, c, o] = sum_{n, y', x} A[n, y', x, (dx, c)] * B[n, y', x, (dy, o)]
    A[n, y', x, (dx, c)] = xpad[n, y', x + dx, c]      (horizontal im2col of the zero-padded input: k*C wide)
    B[n, y', x, (dy, o)] = ct[n, y' - dy, x, o]        (vertical shifts of the output gradient: k*O wide)

  i.e. dk = A^T B, an [k*C, rows] x [rows, k*O] contraction. The rows are processed in chunks under a
  ``lax.scan`` so that A and B never exist whole (they would be k times the activation); images are stacked
  vertically with k-1 zero rows between them, so a chunk may cross an image boundary (tested with chunk sizes
  that leave remainders, on fields with all-zero borders).

Both convolve large batches in groups of images, below XLA:CPU's im2col limit (``conv_safe``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _pads(k: int) -> tuple[int, int]:
    lo = (k - 1) // 2  # 'SAME' for stride 1
    return lo, k - 1 - lo


def conv_xla(x, kernel):
    """Stride-1 'SAME' convolution, NHWC x HWIO -> NHWC (XLA's convolution)."""
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DN)


# XLA:CPU's convolution aborts (std::bad_alloc) once its im2col buffer, N*H*W*kh*kw*C elements, reaches 2^31:
# at 1024x1280 with 16 channels and a 5x5 kernel that is any batch above 4 (measured: batch 16 fails in the
# forward and the input gradient). Larger batches are therefore convolved in groups of images, in a lax.map.
_IM2COL_LIMIT = 2**31 - 1


def _group(n: int, per_image: int) -> int:
    g = max(1, _IM2COL_LIMIT // max(per_image, 1))
    if n <= g:
        return n
    return max(d for d in range(1, g + 1) if n % d == 0)


def _map_groups(fn, g: int, *arrays):
    """fn over groups of g images (arrays share the leading batch axis), results concatenated."""
    n = arrays[0].shape[0]
    if g >= n:
        return fn(*arrays)
    out = lax.map(lambda a: fn(*a), tuple(a.reshape(n // g, g, *a.shape[1:]) for a in arrays))
    return out.reshape(n, *out.shape[2:])


def conv_safe(x, kernel):
    """``conv_xla``, in groups of images small enough for XLA:CPU's im2col buffer."""
    n, h, w, c = x.shape
    g = _group(n, h * w * kernel.shape[0] * kernel.shape[1] * c)
    return _map_groups(lambda a: conv_xla(a, kernel), g, x)


def conv_input_grad(ct, kernel, x_shape):
    """d/dx of sum(ct * conv_xla(x, kernel)) (XLA's transposed convolution), in safe groups of images."""
    n, h, w, c = x_shape
    o = ct.shape[-1]
    g = _group(n, h * w * kernel.shape[0] * kernel.shape[1] * o)

    def one(c_):
        x0 = jax.ShapeDtypeStruct((c_.shape[0], h, w, c), ct.dtype)
        return jax.linear_transpose(lambda a: conv_xla(a, kernel), x0)(c_)[0]

    return _map_groups(one, g, ct)


def kernel_grad(x, ct, k: int, chunk_rows: int = 0):
    """d/dkernel of sum(ct * conv_xla(x, kernel)) for a k x k kernel: [k, k, C, O] in float32.

    ``chunk_rows``: rows of the stacked, padded images per scan step (0 = about 10k pixels per step, so that
    each step's A and B chunks (~3 MB each) stay in cache between their construction and the dot).
    """
    n, h, w, c = x.shape
    o = ct.shape[-1]
    lo, hi = _pads(k)
    hp = h + k - 1
    xpad = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0))).reshape(n * hp, w + k - 1, c)
    ctp = jnp.pad(ct, ((0, 0), (0, k - 1), (0, 0), (0, 0))).reshape(n * hp, w, o)
    rows = n * hp
    r = min(rows, chunk_rows or max(1, 10240 // w))
    steps = -(-rows // r)
    total = steps * r
    xpad = jnp.pad(xpad, ((0, total - rows), (0, 0), (0, 0)))
    ctp = jnp.pad(ctp, ((k - 1, total - rows), (0, 0), (0, 0)))  # k-1 zero rows on top: B[y'] = ct[y' - dy]

    def body(acc, i):
        xs = lax.dynamic_slice_in_dim(xpad, i * r, r, 0)  # [r, w + k - 1, c]
        cs = lax.dynamic_slice_in_dim(ctp, i * r, r + k - 1, 0)  # [r + k - 1, w, o]
        a = jnp.concatenate([xs[:, dx : dx + w] for dx in range(k)], -1)  # [r, w, k*c]   (dx, c)
        b = jnp.concatenate([cs[k - 1 - dy : k - 1 - dy + r] for dy in range(k)], -1)  # [r, w, k*o] (dy, o)
        acc = acc + lax.dot_general(
            a.reshape(r * w, k * c),
            b.reshape(r * w, k * o),
            (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return acc, None

    if steps == 1:
        dk, _ = body(jnp.zeros((k * c, k * o), jnp.float32), 0)
    else:
        dk, _ = lax.scan(body, jnp.zeros((k * c, k * o), jnp.float32), jnp.arange(steps))
    return dk.reshape(k, c, k, o).transpose(2, 0, 1, 3)  # [dx, c, dy, o] -> [dy, dx, c, o]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_fast(x, kernel, chunk_rows: int = 0):
    """The same function as ``conv_xla``, with the kernel gradient computed by ``kernel_grad`` (and batches of
    any size: see ``conv_safe``)."""
    return conv_safe(x, kernel)


def _conv_fast_fwd(x, kernel, chunk_rows):
    return conv_safe(x, kernel), (x, kernel)


def _conv_fast_bwd(chunk_rows, res, ct):
    x, kernel = res
    dx = conv_input_grad(ct, kernel, x.shape).astype(x.dtype)
    dk = kernel_grad(x, ct, kernel.shape[0], chunk_rows).astype(kernel.dtype)
    return dx, dk


conv_fast.defvjp(_conv_fast_fwd, _conv_fast_bwd)
