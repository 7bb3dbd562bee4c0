"""Faster CPU forms of the M-CNN's convolution and max-pool: the SAME functions, the SAME parameters.

``conv`` / ``conv_bias_relu`` pick the form a model's ``impl`` names. ``impl="native"`` (the default) runs
the C++ kernels of ``mcnn_jax.native`` (``conv_native``, ``conv_bias_relu_native``: forward, input gradient
and kernel gradient as direct, register-blocked convolutions, 0.6-0.9 of the matmul peak) where they take the
layer, else the XLA forms below (``impl="fast"``):

Measured on XLA:CPU (benchmarks/profile_step.py, batch 1): for the thin (16-channel) 5x5 convolutions at
full resolution the forward and input-gradient convolutions run at ~30-60% of the fp32 matmul peak, but the
kernel gradient (``conv_general_dilated`` transposed to the weights) runs at 6-13%, and it is the largest
single cost of a training step (~60% of XLA's time for branch0). ``conv_fast`` therefore keeps XLA's
convolution for the forward pass and the input gradient, and computes the kernel gradient as ONE tall-skinny
matmul with no wasted FLOPs (20-26% of peak including building its operands):

    dk[dy, dx, c, o] = sum_{n, y', x} A[n, y', x, (dx, c)] * B[n, y', x, (dy, o)]
    A[n, y', x, (dx, c)] = xpad[n, y', x + dx, c]      (horizontal im2col of the zero-padded input: k*C wide)
    B[n, y', x, (dy, o)] = ct[n, y' - dy, x, o]        (vertical shifts of the output gradient: k*O wide)

i.e. dk = A^T B, an [k*C, rows] x [rows, k*O] contraction (80 x 1.3M x 80 for a 16->16 5x5 conv at
1024x1280); that dot alone runs at ~85% of the 4096^3 matmul rate. The rows are processed in chunks under a ``lax.scan`` so that A
and B never exist whole (they would be k times the activation); images are stacked vertically with k-1 zero
rows between them, so the chunks need not respect image boundaries.

``max_pool`` (kernel = stride, no padding) computes each window's max and the index of its first maximum in one
reduction; its gradient is then one elementwise pass instead of XLA's select-and-scatter, with the same result
(ties included: see ``max_pool``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import native

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
_IM2COL_LIMIT = 2 ** 31 - 1


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

    ``chunk_rows``: rows of the stacked, padded images per scan step (0 = about 10k pixels per step, so
    that each step's A and B chunks (~3 MB each) stay in cache between their construction and the dot:
    measured 3-5x faster than larger chunks, and than XLA's own kernel gradient, at 1024x1280x16).
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
        xs = lax.dynamic_slice_in_dim(xpad, i * r, r, 0)                  # [r, w + k - 1, c]
        cs = lax.dynamic_slice_in_dim(ctp, i * r, r + k - 1, 0)           # [r + k - 1, w, o]
        a = jnp.concatenate([xs[:, dx:dx + w] for dx in range(k)], -1)    # [r, w, k*c]   (dx, c)
        b = jnp.concatenate([cs[k - 1 - dy:k - 1 - dy + r] for dy in range(k)], -1)  # [r, w, k*o] (dy, o)
        acc = acc + lax.dot_general(a.reshape(r * w, k * c), b.reshape(r * w, k * o), (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
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


@jax.custom_vjp
def conv_native(x, kernel):
    """The same function as ``conv_xla`` on the native CPU kernels of ``mcnn_jax.native`` (float32, odd k,
    output channels a multiple of the vector width: see ``native.supports``): the forward pass and the kernel
    gradient always, the input gradient when the input channels allow it (else XLA's transposed convolution)."""
    return native.conv_fwd(x, kernel)


def _conv_native_fwd(x, kernel):
    return conv_native(x, kernel), (x, kernel)


def _native_grads(x, kernel, ct, gate=None):
    """(dx, dkernel, dbias) of conv(x, kernel) + bias for the output gradient ct, masked by gate > 0 if given
    (the ReLU's output: the native kernels mask each row as they read it)."""
    k = kernel.shape[0]
    if native.supports(x.shape[-1], kernel.shape[-1], k, x.dtype)[1]:
        # the transpose of a 'SAME' (odd k) convolution: the flipped, transposed kernel, also 'SAME'
        dx = native.conv_fwd(ct, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), gate=gate)
    else:
        dx = conv_input_grad(ct if gate is None else jnp.where(gate > 0, ct, 0), kernel, x.shape)
    dk, db = native.conv_dk(x, ct, k, gate=gate)
    return dx, dk, db


def _conv_native_bwd(res, ct):
    x, kernel = res
    return _native_grads(x, kernel, ct)[:2]


conv_native.defvjp(_conv_native_fwd, _conv_native_bwd)


@jax.custom_vjp
def conv_bias_relu_native(x, kernel, bias):
    """relu(conv_xla(x, kernel) + bias) in one pass of the native kernels (same conditions as ``conv_native``).

    The backward pass never builds the masked output gradient ct * (z > 0): the native kernels mask each row
    as they read it, and the kernel-gradient pass also sums the bias gradient."""
    return native.conv_fwd(x, kernel, bias, relu=True)


def _cbr_fwd(x, kernel, bias):
    z = conv_bias_relu_native(x, kernel, bias)
    return z, (x, kernel, z)


def _cbr_bwd(res, ct):
    x, kernel, z = res
    return _native_grads(x, kernel, ct, gate=z)


conv_bias_relu_native.defvjp(_cbr_fwd, _cbr_bwd)


def conv_bias_relu(x, kernel, bias, impl: str = "native"):
    """relu(conv(x, kernel) + bias): fused in the native kernels where they take the layer."""
    if impl == "native" and native.supports(x.shape[-1], kernel.shape[-1], kernel.shape[0], x.dtype)[0]:
        return conv_bias_relu_native(x, kernel, bias)
    return jax.nn.relu(conv(x, kernel, impl) + bias)


def conv(x, kernel, impl: str = "native"):
    """The 'SAME' stride-1 convolution in the form ``impl`` names: "native" (``conv_native`` where the native
    kernels take the layer, else "fast"), "fast" (``conv_fast``) or "xla" (``conv_xla``)."""
    if impl == "native":
        if native.supports(x.shape[-1], kernel.shape[-1], kernel.shape[0], x.dtype)[0]:
            return conv_native(x, kernel)
        if not native.available():
            native.warn_unavailable()
        impl = "fast"
    return conv_fast(x, kernel) if impl == "fast" else conv_xla(x, kernel)


def _window_index(shape, f: int):
    """Row-major position (i * f + j) of each element of [n, h/f, f, w/f, f, c] windows within its window."""
    return lax.broadcasted_iota(jnp.int32, shape, 2) * f + lax.broadcasted_iota(jnp.int32, shape, 4)


def _max_and_first(a, b):
    """Reduction of (value, window index) pairs: the larger value; among equal values the lower index (the
    first in row-major order, as XLA's max-pool gradient chooses); NaN wins, so NaN propagates as in max."""
    (av, ai), (bv, bi) = a, b
    pick_a = (av > bv) | ((av == bv) & (ai < bi)) | ((av != av) & ((bv == bv) | (ai < bi)))
    return jnp.where(pick_a, av, bv), jnp.where(pick_a, ai, bi)


def _pool_argmax(x, f: int):
    """(max, the row-major index within the window of its FIRST occurrence) of each f x f window, in one pass."""
    n, h, w, c = x.shape
    xs = x.reshape(n, h // f, f, w // f, f, c)
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(f * f, jnp.int32))
    return lax.reduce((xs, _window_index(xs.shape, f)), init, _max_and_first, (2, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x, f: int):
    """Max-pool NHWC by f (kernel = stride = f, no padding): the same function and gradient as XLA's
    ``reduce_window`` max-pool (``flax.linen.max_pool``).

    The gradient goes to ONE input per window: the first maximum in row-major order, as XLA's
    select-and-scatter chooses. Ties are common, not rare: a flat background, a saturated object or an
    all-zero border makes a convolution's output constant over a region, so a window can hold thousands of
    equal maxima (tests/test_pool.py). The forward pass records the winner's window index (one variadic
    reduction: the max and its index together), so the backward pass is one elementwise pass that reads only
    that index and the output gradient, never the input.
    """
    return x if f == 1 else _pool_argmax(x, f)[0]


def _max_pool_fwd(x, f):
    if f == 1:
        return x, None
    y, arg = _pool_argmax(x, f)
    return y, arg.astype(jnp.uint16 if f * f <= 2 ** 16 else jnp.int32)  # the index, small


def _max_pool_bwd(f, arg, ct):
    if f == 1:
        return (ct,)
    n, ho, wo, c = ct.shape
    shape = (n, ho, f, wo, f, c)
    won = _window_index(shape, f) == arg.astype(jnp.int32)[:, :, None, :, None, :]
    return (jnp.where(won, ct[:, :, None, :, None, :], 0).astype(ct.dtype).reshape(n, ho * f, wo * f, c),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
