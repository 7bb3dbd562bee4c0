"""The M-CNN's layers and the one place that chooses how they are computed.

``impl`` names the form; all three compute the same function with the same parameters:

- ``"native"`` (the default): the C++ kernels of ``mcnn_jax.model.native`` where they take the layer (float32, odd k,
  output channels a multiple of the CPU's vector width), else ``"fast"``;
- ``"fast"``: XLA's convolution with the kernel gradient as chunked matmuls (``xla_conv.conv_fast``);
- ``"xla"``: XLA's convolution and gradients, as ``flax.linen.Conv`` computes them.

Max-pooling is ``pool.fast_max_pool`` for "native" and "fast", XLA's ``reduce_window`` for "xla".
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcnn_jax.model import native, pool, xla_conv

IMPLS = ("native", "fast", "xla")


def conv_bias(x, kernel, bias, impl: str = "native", relu: bool = False):
    """conv(x, kernel) + bias (stride 1, 'SAME', NHWC x HWIO), then a ReLU if ``relu``, in the form ``impl``
    names (see the module doc): the only function that chooses between the native kernels and XLA."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "native":
        if native.supports(x.shape[-1], kernel.shape[-1], kernel.shape[0], x.dtype).forward:
            return native.conv_bias_relu(x, kernel, bias) if relu else native.conv(x, kernel) + bias
        if not native.available():
            native.warn_unavailable()
        impl = "fast"
    y = (xla_conv.conv_fast if impl == "fast" else xla_conv.conv_xla)(x, kernel) + bias
    return jax.nn.relu(y) if relu else y


def max_pool(x, f: int, impl: str = "native"):
    """Max-pool NHWC by f (kernel = stride = f), in the form ``impl`` names (the same values and gradients)."""
    if f == 1:
        return x
    if impl == "xla":
        return nn.max_pool(x, (f, f), strides=(f, f))
    return pool.fast_max_pool(x, f)


class Conv(nn.Module):
    """A stride-1 'SAME' KxK convolution + bias (+ ReLU if ``relu``: fused into one pass by the native kernels),
    with ``flax.linen.Conv``'s parameters (``kernel`` HWIO, ``bias``; float32) and initialisers."""

    features: int
    kernel_size: int = 5
    dtype: Any = jnp.float32
    impl: str = "native"
    relu: bool = False

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.xavier_uniform(), (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        return conv_bias(x, kernel, bias, self.impl, self.relu)
