"""Native CPU kernels for the M-CNN's KxK convolutions (``conv.cc``), as XLA FFI custom calls.

The C++ source ships with the package and is compiled on first use, on the machine that runs it
(``-O3 -march=native -fopenmp``: AVX2 or AVX-512 code as the CPU has), into
``$XDG_CACHE_HOME/mcnn-jax/native/`` (``~/.cache``; ``MCNN_NATIVE_CACHE`` overrides the folder). The library
is keyed by a hash of the source, the compiler, the flags, the CPU's instruction sets and jaxlib's version, so
a cluster with mixed node types keeps one build per CPU kind. The compiler is ``$CXX`` or ``g++``.

If the kernels cannot be built (no C++ compiler, no OpenMP) :func:`status` says why, and the model falls back
to the XLA form (``impl="fast"``) with one warning. ``MCNN_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

_SOURCE = Path(__file__).with_name("conv.cc")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
_TARGETS = {"mcnn_conv_fwd": "McnnConvFwd", "mcnn_conv_dk": "McnnConvDk"}
_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    if os.environ.get("MCNN_NATIVE_CACHE"):
        return Path(os.environ["MCNN_NATIVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mcnn-jax" / "native"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    import platform
    return platform.processor()


def _compiler() -> tuple[str, str]:
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX, or install g++)")
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return path, (version[0] if version else "")


def build() -> Path:
    """Compiles ``conv.cc`` for this CPU if no matching build is cached; returns the shared library's path.

    The build goes to a temporary file that is renamed into place, so concurrent ranks on a shared
    filesystem never load a half-written library.
    """
    cxx, version = _compiler()
    source = _SOURCE.read_bytes()
    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(_FLAGS).encode(),
                                     _cpu_flags().encode(), jax.__version__.encode()])).hexdigest()[:16]
    out = cache_dir() / f"libmcnn_conv-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> dict:
    with _lock:
        if _state:
            return _state
        if os.environ.get("MCNN_NATIVE", "1") == "0":
            _state.update(ok=False, reason="turned off by MCNN_NATIVE=0")
            return _state
        try:
            path = build()
            lib = ctypes.CDLL(str(path))
            for target, symbol in _TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _state.update(ok=True, reason="", path=str(path), lib=lib,
                          vector_width=int(lib.mcnn_vector_width()), threads=int(lib.mcnn_max_threads()))
        except Exception as e:  # noqa: BLE001 - any failure means "fall back", with the reason kept
            _state.update(ok=False, reason=f"{type(e).__name__}: {e}")
        return _state


def status() -> dict:
    """{ok, reason, path, vector_width, threads}: whether the native kernels are usable here, and why not."""
    s = _load()
    return {k: v for k, v in s.items() if k != "lib"}


def available() -> bool:
    return bool(_load()["ok"])


@functools.cache
def warn_unavailable() -> None:
    warnings.warn(f"mcnn_jax native convolution kernels unavailable ({status()['reason']}); using the XLA "
                  "form (model.impl='fast'), which is slower", RuntimeWarning, stacklevel=3)


def supports(in_channels: int, out_channels: int, kernel_size: int, dtype) -> tuple[bool, bool]:
    """(forward and kernel gradient, input gradient): which passes the native kernels can take."""
    if not available() or jnp.dtype(dtype) != jnp.float32 or kernel_size % 2 == 0:
        return False, False
    vw = _state["vector_width"]
    return out_channels % vw == 0, in_channels % vw == 0


def _require() -> None:
    if not available():
        raise RuntimeError(f"mcnn_jax native kernels unavailable: {status()['reason']}")


def conv_fwd(x, kernel, bias=None, gate=None, relu: bool = False):
    """y = 'SAME' stride-1 convolution of the NHWC input with the HWIO kernel (float32, odd k), plus ``bias``,
    then max(y, 0) if ``relu``. With ``gate``, the input is first masked: x * (gate > 0)."""
    _require()
    o = kernel.shape[-1]
    out = jax.ShapeDtypeStruct((*x.shape[:3], o), jnp.float32)
    bias = jnp.zeros((o,), jnp.float32) if bias is None else bias
    return jax.ffi.ffi_call("mcnn_conv_fwd", out, vmap_method="sequential")(
        x, x if gate is None else gate, kernel, bias, gated=gate is not None, relu=bool(relu))


def conv_dk(x, ct, k: int, gate=None):
    """(dk [k, k, C, O], db [O]): the kernel and bias gradients of the 'SAME' convolution of ``x`` plus a bias,
    given its output gradient ``ct`` (masked first, ct * (gate > 0), with ``gate``)."""
    _require()
    out = (jax.ShapeDtypeStruct((k, k, x.shape[-1], ct.shape[-1]), jnp.float32),
           jax.ShapeDtypeStruct((ct.shape[-1],), jnp.float32))
    return jax.ffi.ffi_call("mcnn_conv_dk", out, vmap_method="sequential")(
        x, ct, ct if gate is None else gate, gated=gate is not None)
