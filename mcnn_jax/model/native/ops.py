"""The native kernels as differentiable JAX ops: each XLA FFI call beside the custom VJP that uses it.

``conv(x, kernel)`` and ``conv_bias_relu(x, kernel, bias)`` compute the same functions as XLA's stride-1 'SAME'
convolution (plus bias and ReLU), with the forward pass, the input gradient and the kernel (and bias) gradient
on the C++ kernels of ``conv.cc`` (float32, odd k, output channels a multiple of the vector width:
``supports``). The input gradient is the forward kernel applied to the output gradient with the flipped,
transposed kernel (exact for odd k, whose 'SAME' padding is symmetric); where the input channels do not allow
it, XLA's transposed convolution computes it.

The fused op's backward pass never builds the masked output gradient ct * (z > 0): the kernels mask each row
as they read it. The mask is z > 0 on the ReLU's OUTPUT, i.e. a pre-activation of exactly 0 gets no gradient,
as ``jax.nn.relu``'s does (exercised by tests on fields with all-zero borders, where pre-activations are exactly
0 over whole regions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcnn_jax.model.native.library import require, supports
from mcnn_jax.model.xla_conv import conv_input_grad


def conv_fwd(x, kernel, bias=None, gate=None, relu: bool = False):
    """y = 'SAME' stride-1 convolution of the NHWC input with the HWIO kernel (float32, odd k), plus ``bias``,
    then max(y, 0) if ``relu``. With ``gate``, the input is first masked: x * (gate > 0)."""
    require()
    o = kernel.shape[-1]
    out = jax.ShapeDtypeStruct((*x.shape[:3], o), jnp.float32)
    bias = jnp.zeros((o,), jnp.float32) if bias is None else bias
    return jax.ffi.ffi_call("mcnn_conv_fwd", out, vmap_method="sequential")(
        x, x if gate is None else gate, kernel, bias, gated=gate is not None, relu=bool(relu)
    )


def conv_dk(x, ct, k: int, gate=None):
    """(dk [k, k, C, O], db [O]): the kernel and bias gradients of the 'SAME' convolution of ``x`` plus a bias,
    given its output gradient ``ct`` (masked first, ct * (gate > 0), with ``gate``)."""
    require()
    out = (
        jax.ShapeDtypeStruct((k, k, x.shape[-1], ct.shape[-1]), jnp.float32),
        jax.ShapeDtypeStruct((ct.shape[-1],), jnp.float32),
    )
    return jax.ffi.ffi_call("mcnn_conv_dk", out, vmap_method="sequential")(
        x, ct, ct if gate is None else gate, gated=gate is not None
    )


@jax.custom_vjp
def conv(x, kernel):
    """The stride-1 'SAME' convolution (NHWC x HWIO) on the native kernels: forward, input and kernel gradient."""
    return conv_fwd(x, kernel)


def _conv_fwd(x, kernel):
    return conv(x, kernel), (x, kernel)


def _grads(x, kernel, ct, gate=None):
    """(dx, dkernel, dbias) of conv(x, kernel) + bias for the output gradient ct, masked by gate > 0 if given
    (the ReLU's output)."""
    k = kernel.shape[0]
    if supports(x.shape[-1], kernel.shape[-1], k, x.dtype).input_grad:
        dx = conv_fwd(ct, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), gate=gate)
    else:
        dx = conv_input_grad(ct if gate is None else jnp.where(gate > 0, ct, 0), kernel, x.shape)
    dk, db = conv_dk(x, ct, k, gate=gate)
    return dx, dk, db


def _conv_bwd(res, ct):
    x, kernel = res
    return _grads(x, kernel, ct)[:2]


conv.defvjp(_conv_fwd, _conv_bwd)


@jax.custom_vjp
def conv_bias_relu(x, kernel, bias):
    """relu(conv(x, kernel) + bias) in one pass of the native kernels, and its gradients in two."""
    return conv_fwd(x, kernel, bias, relu=True)


def _cbr_fwd(x, kernel, bias):
    z = conv_bias_relu(x, kernel, bias)
    return z, (x, kernel, z)


def _cbr_bwd(res, ct):
    x, kernel, z = res
    return _grads(x, kernel, ct, gate=z)


conv_bias_relu.defvjp(_cbr_fwd, _cbr_bwd)
