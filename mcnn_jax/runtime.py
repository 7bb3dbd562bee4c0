"""Process set-up shared by the command-line tools."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable_compilation_cache() -> str | None:
    """Keeps XLA's compiled steps on disk, so a rerun (a resume, another rank, an evaluation) skips compiling.

    The folder is ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/mcnn-jax/xla`` (``~/.cache``);
    ``MCNN_COMPILATION_CACHE=0`` turns it off.
    """
    if os.environ.get("MCNN_COMPILATION_CACHE", "1") == "0":
        return None
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mcnn-jax" / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
