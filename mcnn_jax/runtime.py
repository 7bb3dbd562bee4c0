"""Process set-up shared by the command-line tools: the cache folder, XLA's compilation cache, logging to the
terminal and to one file per MPI rank, and the stop request that SIGTERM / SIGINT raise."""

from __future__ import annotations

import logging as pylogging
import os
import signal
import sys
from pathlib import Path

import jax
from absl import logging


def cache_dir(name: str, env: str | None = None) -> Path:
    """``$XDG_CACHE_HOME/mcnn-jax/<name>`` (``~/.cache`` without XDG_CACHE_HOME), or the folder named by the
    environment variable ``env`` when it is set."""
    if env and os.environ.get(env):
        return Path(os.environ[env])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mcnn-jax" / name


def enable_compilation_cache() -> str | None:
    """Keeps XLA's compiled steps on disk, so a rerun (a resume, another rank, an evaluation) skips compiling.

    The folder is ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``cache_dir("xla")``;
    ``MCNN_COMPILATION_CACHE=0`` turns it off.
    """
    if os.environ.get("MCNN_COMPILATION_CACHE", "1") == "0":
        return None
    path = str(cache_dir("xla", env="JAX_COMPILATION_CACHE_DIR"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


# --- logging -------------------------------------------------------------------------------------------------
class _TerminalHandler(pylogging.Handler):
    """Writes a record's message as a plain line, through tqdm so that a progress bar stays intact."""

    def __init__(self, stream: str, level, prefix: str = ""):
        super().__init__(level)
        self.stream_name, self.prefix = stream, prefix  # looked up at each line: sys.stdout may be replaced

    def emit(self, record):
        try:
            from tqdm import tqdm

            stream = getattr(sys, self.stream_name)
            msg = record.getMessage()
            if record.levelno == pylogging.WARNING:
                msg = f"warning: {msg}"
            tqdm.write(self.prefix + msg, file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_PACKAGE = str(Path(__file__).resolve().parent)  # mcnn_jax, wherever it is installed
_LIBRARIES = tuple({str(Path(p).resolve()) for p in sys.path if Path(p).name in ("site-packages", "dist-packages")})


def _ours_or_warning(record) -> bool:
    """Every warning, and the INFO lines of anything but installed libraries (Orbax logs much at INFO through
    absl too)."""
    path = record.pathname
    return (
        record.levelno >= pylogging.WARNING
        or path.startswith(_PACKAGE)
        or not (_LIBRARIES and path.startswith(_LIBRARIES))
    )


def _our_handler(h) -> bool:
    return getattr(h, "_mcnn", False)


def setup_logging(workdir=None, rank: int = 0, size: int = 1, terminal: str = "stdout") -> Path | None:
    """Routes ``absl.logging`` to the terminal and, with a ``workdir``, to ``<workdir>/logs/rank<R>.log``.

    Rank 0 prints INFO lines (the progress) to ``terminal`` ("stdout" or "stderr"); every rank prints its warnings
    and errors to stderr, prefixed by its rank when there are several; each rank's file keeps all of its lines
    with time stamps, so a warning of rank 17 is never lost. Calling it again replaces the earlier set-up.
    """
    logger = logging.get_absl_logger()
    for h in [h for h in logger.handlers if _our_handler(h)]:
        logger.removeHandler(h)
        h.close()
    prefix = f"[rank {rank}] " if size > 1 else ""
    handlers = [_TerminalHandler("stderr", pylogging.WARNING, prefix)]
    if rank == 0:
        out = _TerminalHandler(terminal, pylogging.INFO)
        out.addFilter(lambda r: r.levelno < pylogging.WARNING)
        handlers.append(out)
    path = None
    if workdir is not None:
        path = Path(workdir) / "logs" / f"rank{rank}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        file = pylogging.FileHandler(path)
        file.setFormatter(pylogging.Formatter(f"%(asctime)s rank {rank}/{size} %(levelname)s %(message)s"))
        handlers.append(file)
    for h in handlers:
        h._mcnn = True
        h.addFilter(_ours_or_warning)
        logger.addHandler(h)
    logger.propagate = False  # absl's own stderr handler would print every line a second time
    logging.set_verbosity(logging.INFO)
    return path


def ensure_terminal_logging(stream: str = "stderr") -> None:
    """Shows INFO lines on ``stream`` unless ``setup_logging`` has routed them already;
    for tools such as ``mcnn-data`` that log progress without a work directory."""
    if not any(_our_handler(h) for h in logging.get_absl_logger().handlers):
        setup_logging(terminal=stream)


# --- signals -------------------------------------------------------------------------------------------------
class StopRequest:
    """While entered, SIGTERM / SIGINT (a cluster preempting the job, or Ctrl-C) set ``signum``, which asks the
    loop to checkpoint and exit; a second SIGINT interrupts at once. Leaving restores the old handlers."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
