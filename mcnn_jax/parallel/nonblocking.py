"""A sum over ranks in two halves inside the jitted step, so that compute runs while it travels (``train.overlap``).

XLA's CPU runtime runs a collective (mpi4jax's, or any host callback) on its own thread and waits for it: the
compute that does not depend on it is not run meanwhile (``benchmarks/bench_overlap.py``). ``Exchanger`` splits
the sum into two host callbacks:

- ``start(arrays) -> ticket``: copies ``arrays`` into one host buffer (the callback's inputs belong to XLA and are not
  ours after the callback returns; the buffer is reused from step to step), hands the copy to a background thread that
  sums it over the ranks with a blocking MPI Allreduce (``reduce``: ``World.background_sum``, on its own clone of the
  communicator; mpi4py releases the GIL inside MPI calls), and returns at once a ticket (an int32 scalar);
- ``finish(ticket) -> sums``: waits for that thread and returns the sums, as arrays of the started shapes.

Between the two the step runs whatever the data flow puts there: ``start`` passes an array through (``then``:
what uses its output waits for the start) and ``finish`` takes one more operand (``after``: the finish waits
for it). Real data dependencies, not ``jax.lax.optimization_barrier``: no barrier is left in XLA:CPU's compiled
program, and with them the finish ran right after the start (``tests/test_overlap.py``). With one process
``reduce`` is None and the thread returns the copy after ``delay`` seconds (0 unless a benchmark stands a sleep in
for the network), so the mechanism runs and is tested without MPI.
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
        self._free: dict[int, list] = {}  # host buffers to reuse, by size
        self.events: collections.deque = collections.deque(maxlen=1000)

    # --- host side ------------------------------------------------------------------------------------------
    def _sum(self, ticket: int, buf: np.ndarray) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        if self.reduce is not None:
            buf = self.reduce(buf)
        self.events.append(("summed", ticket, time.perf_counter()))
        return buf

    def _start(self, arrays, then):
        ticket = next(self._tickets) % (2**31)
        self.events.append(("start", ticket, time.perf_counter()))
        sizes = [int(np.size(a)) for a in arrays]
        free = self._free.setdefault(sum(sizes), [])
        buf = free.pop() if free else np.empty(sum(sizes), np.float32)  # reused: no page faults every step
        for a, lo, n in zip(arrays, np.cumsum([0] + sizes), sizes):
            np.copyto(buf[lo : lo + n], np.asarray(a, np.float32).ravel())  # a copy: ours
        self._pending[ticket] = self._pool.submit(self._sum, ticket, buf)
        return np.asarray(ticket, np.int32), np.array(then, copy=True)

    def _finish(self, ticket, shapes, after=None) -> list:
        ticket = int(ticket)
        self.events.append(("finish", ticket, time.perf_counter()))
        future = self._pending.pop(ticket, None)
        if future is None:
            raise RuntimeError(f"overlap: finish of ticket {ticket}, which was never started (or finished twice)")
        total = future.result()
        self._free.setdefault(total.size, []).append(total)  # XLA copies the result before the next start
        ends = np.cumsum([int(np.prod(s)) for s in shapes])
        return [part.reshape(s) for part, s in zip(np.split(total, ends[:-1]), shapes)]

    # --- inside jit -------------------------------------------------------------------------------------------
    def start(self, arrays: list, then: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Starts summing the float32 ``arrays`` over the ranks (packed into one buffer on the host: an XLA
        concatenation of the 81920 x 512 gradient cost more than the copy); returns the ticket (int32 scalar) and
        ``then``, passed through the callback: what uses that copy of ``then`` runs after the start."""
        out = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct(then.shape, then.dtype))
        return io_callback(self._start, out, [a.astype(jnp.float32) for a in arrays], then)

    def finish(self, ticket: jax.Array, like: list, after) -> list:
        """Waits for ``ticket``'s sums: float32 arrays of the shapes of ``like`` (the arrays started). ``after``
        (a pytree, unused) are operands, so the finish (and its wait) comes after what computes them."""
        shapes = [tuple(a.shape) for a in like]
        out = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
        return io_callback(lambda t, a: self._finish(t, shapes, a), out, ticket, after)

    def close(self):
        self._pool.shutdown(wait=True)
