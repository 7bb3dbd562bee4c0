"""Compiling and loading the native kernels (``conv.cc``) for the CPU this process runs on.

The library is built into ``runtime.cache_dir("native")`` (``$XDG_CACHE_HOME/mcnn-jax/native``;
``MCNN_NATIVE_CACHE`` overrides it), keyed by a hash of the source, the compiler, the flags, the CPU's
instruction sets and jax's version: a cluster with mixed node types keeps one build per CPU kind. The compiler
is ``$CXX`` or ``g++``. ``MCNN_NATIVE=0`` turns the kernels off.
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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mcnn_jax import runtime

_SOURCE = Path(__file__).with_name("conv.cc")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
_TARGETS = {"mcnn_conv_fwd": "McnnConvFwd", "mcnn_conv_dk": "McnnConvDk"}
_lock = threading.Lock()
_state: dict = {}


def native_cache_dir() -> Path:
    return runtime.cache_dir("native", env="MCNN_NATIVE_CACHE")


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
    key = hashlib.sha256(
        b"\0".join(
            [source, version.encode(), " ".join(_FLAGS).encode(), _cpu_flags().encode(), jax.__version__.encode()]
        )
    ).hexdigest()[:16]
    out = native_cache_dir() / f"libmcnn_conv-{key}.so"
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
            _state.update(
                ok=True,
                reason="",
                path=str(path),
                lib=lib,
                vector_width=int(lib.mcnn_vector_width()),
                threads=int(lib.mcnn_max_threads()),
            )
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
    warnings.warn(
        f"mcnn_jax native convolution kernels unavailable ({status()['reason']}); using the XLA "
        "form (model.impl='fast'), which is slower",
        RuntimeWarning,
        stacklevel=3,
    )


class Support(NamedTuple):
    """Which passes of a layer the native kernels can take."""

    forward: bool  # the forward pass and the kernel gradient (output channels a multiple of the vector width)
    input_grad: bool  # the input gradient (input channels a multiple of the vector width)


def supports(in_channels: int, out_channels: int, kernel_size: int, dtype) -> Support:
    """Which passes of a float32, odd-k, stride-1 'SAME' layer the native kernels can take here."""
    if not available() or jnp.dtype(dtype) != jnp.float32 or kernel_size % 2 == 0:
        return Support(False, False)
    vw = _state["vector_width"]
    return Support(out_channels % vw == 0, in_channels % vw == 0)


def require() -> None:
    if not available():
        raise RuntimeError(f"mcnn_jax native kernels unavailable: {status()['reason']}")
