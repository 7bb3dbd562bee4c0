"""Shared fixtures: small stores built once per session; MPI tests run alone under pytest-xdist; one persistent XLA
compilation cache for the whole run."""

import fcntl
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# One XLA compilation cache for the run, shared by the xdist workers and every process a test starts (mcnn-train,
# mpiexec): the tiny config's train step, compiled by dozens of subprocesses, is compiled once. Set before JAX is
# imported (the variables are read then, and subprocesses inherit them); a run's own directory, so a test never
# reads a program compiled by another checkout.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"mcnn-jax-xla-cache-{_RUN}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The processes the tests start (mcnn-train, mpiexec) are compile-bound (tiny fields, a few steps): XLA's backend at
# optimisation level 0 initialises and compiles the tiny config's train step in half the time
# (benchmarks/compile_time.py). The tests' own processes (pytest and its xdist workers) keep XLA's default level: they
# run float64 references and finite differences, whose convolutions run 4-5x slower at level 0 (the three
# finite-difference tests of test_realistic_fields.py: 28 s instead of 234 s). JAX reads XLA_FLAGS once, when its
# backend starts: so the flag is taken out (a worker inherits it from the controller), the backend started, and the
# flag set again for the child processes alone. A bit-for-bit comparison is between programs compiled alike (a
# started run against a started run: test_train.py's uninterrupted_cli).
_LEVEL0 = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "").replace(_LEVEL0, "").strip()
import jax  # noqa: E402

jax.devices()
os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_LEVEL0}".strip()

REPO = Path(__file__).resolve().parents[1]
BBBC021_CSVS = REPO.parent / "shared" / "bbbc021"  # CI: ../shared/bbbc021 relative to the repo root


@pytest.fixture(autouse=True)
def _mpi_tests_run_alone(request):
    """Under pytest-xdist, a test marked ``mpi`` (``mpiexec -n 2``) holds an exclusive lock and every other test
    a shared one, so two MPI ranks never share the two cores with another worker's test: oversubscribed, MPI's
    busy-waiting ranks ran 4-5x slower (203 s instead of ~40 s for tests/test_comm.py's two-rank test)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    lock = Path(tempfile.gettempdir()) / f"mcnn-jax-pytest-{os.environ.get('PYTEST_XDIST_TESTRUNUID', 'run')}.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if request.node.get_closest_marker("mpi") else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def data_synthetic_store(tmp_path_factory):
    """A 48-image, 4-class, 128x128 synthetic store (generated + imported once)."""
    from mcnn_jax.data import prepare_synthetic_store

    root = tmp_path_factory.mktemp("synthetic")
    return prepare_synthetic_store(root, num_images=48, num_classes=4, height=128, width=128, seed=3, progress=False)


@pytest.fixture()
def data_tiny_store(tmp_path):
    """A store of 10 random 8x6x2 uint16 images with labels i % 3 and compounds c0..c4 (writer API)."""
    from mcnn_jax.data.store import StoreWriter

    rng = np.random.default_rng(0)
    images = rng.integers(0, 65535, (10, 8, 6, 2), dtype=np.uint16)
    w = StoreWriter(tmp_path / "tiny", 10, (8, 6, 2), "uint16")
    for i, im in enumerate(images):
        w.write(i, im)
    labels = [i % 3 for i in range(10)]
    w.finish(
        labels,
        ["a", "b", "c"],
        {"compound": [f"c{i % 5}" for i in range(10)], "class": ["abc"[i % 3] for i in range(10)]},
        ["x", "y"],
    )
    return tmp_path / "tiny", images


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """The synthetic store of configs/tiny.py (the trainer and MPI tests), generated once for the session."""
    from mcnn_jax.config import load_config
    from mcnn_jax.data import prepare_synthetic_store

    cfg = load_config(str(REPO / "configs" / "tiny.py")).data.synthetic
    return str(
        prepare_synthetic_store(
            tmp_path_factory.mktemp("tiny_data"),
            num_images=cfg.num_images,
            num_classes=cfg.num_classes,
            height=cfg.height,
            width=cfg.width,
            seed=cfg.seed,
            progress=False,
        )
    )


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def loss_fn(x, labels):
    """Cross-entropy of a model's logits on (x, labels), as a function of (params, model)."""
    import jax
    import jax.numpy as jnp

    def loss(p, m):
        logits = m.apply({"params": p}, x)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

    return loss


def assert_same_model(plain, other, params, x, labels):
    """``other`` computes the same outputs (rtol 1e-5) and parameter gradients (relative 1e-4) as ``plain``."""
    import jax

    np.testing.assert_allclose(
        jax.jit(other.apply)({"params": params}, x), jax.jit(plain.apply)({"params": params}, x), rtol=1e-5, atol=1e-6
    )
    grad = jax.jit(jax.grad(lambda p, m, x, y: loss_fn(x, y)(p, m)), static_argnums=1)  # x an argument, not a
    g0, g1 = grad(params, plain, x, labels), grad(params, other, x, labels)  # constant that XLA would fold
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves(g1)):
        assert rel_err(b, a) < 1e-4, jax.tree_util.keystr(path)
