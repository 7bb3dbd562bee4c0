"""A sum over ranks in two halves inside the jitted step, so that compute runs while it travels (``train.overlap``).

XLA's CPU runtime runs a collective (mpi4jax's, or any host callback) on its own thread and waits for it: the
compute that does not depend on it is not run meanwhile (``benchmarks/bench_overlap.py``). ``Exchanger`` splits
the sum into two host callbacks:

- ``start(x) -> ticket``: copies ``x`` (the callback's input buffer belongs to XLA and is not ours after the
  callback returns), hands the copy to a background thread that sums it over the ranks with a blocking MPI
  Allreduce (``reduce``: ``World.background_sum``, on its own clone of the communicator; mpi4py releases the GIL
  inside MPI calls), and returns at once a ticket (an int32 scalar);
- ``finish(ticket) -> sum``: waits for that thread and returns the sum.

Between the two the step runs whatever the data flow puts there: ``start`` passes an array through (``then``:
what uses its output waits for the start) and ``finish`` takes one more operand (``after``: the finish waits
for it). Real data dependencies, not ``jax.lax.optimization_barrier``: XLA:CPU's compiler drops the barriers
(``OptimizationBarrierExpander``) and, with them, the order they were to impose (``tests/test_overlap.py``). With one process ``reduce`` is None and the thread returns the copy after ``delay`` seconds (0
unless a benchmark stands a sleep in for the network), so the mechanism runs and is tested without MPI.
``events`` records (what, ticket, time.perf_counter()) of every start, sum done and finish, for tests and
benchmarks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback


class Exchanger:
    """The two halves of a float32 sum over ranks; one background thread, owned here (``close`` ends it)."""

    def __init__(self, reduce: Callable[[np.ndarray], np.ndarray] | None = None, delay: float = 0.0):
        self.reduce, self.delay = reduce, delay
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mcnn-overlap")
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._tickets = itertools.count()
        self.events: collections.deque = collections.deque(maxlen=1000)

    # --- host side ------------------------------------------------------------------------------------------
    def _sum(self, ticket: int, buf: np.ndarray) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        if self.reduce is not None:
            buf = self.reduce(buf)
        self.events.append(("summed", ticket, time.perf_counter()))
        return buf

    def _start(self, x, then):
        ticket = next(self._tickets) % (2 ** 31)
        self.events.append(("start", ticket, time.perf_counter()))
        self._pending[ticket] = self._pool.submit(self._sum, ticket, np.array(x, dtype=np.float32, copy=True))
        return np.asarray(ticket, np.int32), np.array(then, copy=True)

    def _finish(self, ticket, after=None) -> np.ndarray:
        ticket = int(ticket)
        self.events.append(("finish", ticket, time.perf_counter()))
        future = self._pending.pop(ticket, None)
        if future is None:
            raise RuntimeError(f"overlap: finish of ticket {ticket}, which was never started (or finished twice)")
        return future.result()

    # --- inside jit -------------------------------------------------------------------------------------------
    def start(self, x: jax.Array, then: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Starts summing the flat float32 ``x`` over the ranks; returns its ticket (int32 scalar) and ``then``,
        passed through the callback: what uses that copy of ``then`` runs after the start."""
        out = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct(then.shape, then.dtype))
        return io_callback(self._start, out, x.astype(jnp.float32), then)

    def finish(self, ticket: jax.Array, like: jax.Array, after: jax.Array) -> jax.Array:
        """Waits for ``ticket``'s sum: a float32 array of ``like``'s shape. ``after`` (unused) is an operand, so
        the finish (and its wait) comes after what computes it."""
        return io_callback(self._finish, jax.ShapeDtypeStruct(like.shape, jnp.float32), ticket, after)

    def close(self):
        self._pool.shutdown(wait=True)
