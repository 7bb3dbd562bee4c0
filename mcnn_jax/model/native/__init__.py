"""Native CPU kernels for the M-CNN's KxK convolutions (``conv.cc``), as XLA FFI custom calls.

The C++ source ships with the package and is compiled on first use, on the machine that runs it
(``-O3 -march=native -fopenmp``: AVX2 or AVX-512 code as the CPU has; ``build``). If the kernels cannot be
built (no C++ compiler, no OpenMP) :func:`status` says why, and the model falls back to the XLA form
(``impl="fast"``) with one warning. ``MCNN_NATIVE=0`` turns them off.

- ``library``: compiling and loading the library, ``status`` / ``available`` / ``supports``;
- ``ops``: the FFI calls (``conv_fwd``, ``conv_dk``) and the differentiable ops ``conv`` and ``conv_bias_relu``.
"""

from mcnn_jax.model.native.library import (
    Support,
    available,
    build,
    native_cache_dir,
    status,
    supports,
    warn_unavailable,
)
from mcnn_jax.model.native.ops import conv, conv_bias_relu, conv_dk, conv_fwd

__all__ = [
    "Support",
    "available",
    "build",
    "native_cache_dir",
    "conv",
    "conv_bias_relu",
    "conv_dk",
    "conv_fwd",
    "status",
    "supports",
    "warn_unavailable",
]
