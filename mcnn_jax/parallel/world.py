"""MPI data parallelism: who am I, the fused gradient allreduce, broadcasts, and failing the whole job fast.

Under ``mpiexec -n N`` every rank runs the same program on its share of each global batch. Gradients (and the step's
metric sums) are packed into one flat float32 buffer and summed with ONE mpi4jax allreduce inside the jitted train step
(GradientFlow's fused "lazy" allreduce; see ``mcnn_jax.step``). Run without ``mpiexec``, the world is one rank and
nothing touches MPI beyond initialising it. Host-side collectives (broadcasts, sums of evaluation counts, barriers) are
methods of ``World`` too: no other module calls mpi4py.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class World:
    rank: int = 0
    size: int = 1
    comm: Any = None  # mpi4py communicator for host-side collectives
    jax_comm: Any = None  # a clone of it, used only by mpi4jax inside jitted code
    _timed_allreduce: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    # --- host-side collectives (cheap, small) -----------------------------------------------------------
    def barrier(self):
        if self.size > 1:
            self.comm.Barrier()

    def bcast_object(self, obj):
        return self.comm.bcast(obj, root=0) if self.size > 1 else obj

    def allreduce_host_sum(self, value):
        """The sum over ranks of a number or a NumPy array (arrays are summed in place and returned)."""
        if self.size == 1:
            return value
        from mpi4py import MPI

        if isinstance(value, np.ndarray):
            self.comm.Allreduce(MPI.IN_PLACE, value, op=MPI.SUM)
            return value
        return self.comm.allreduce(value, op=MPI.SUM)

    def bcast_tree(self, tree):
        """Rank 0's values of every leaf of ``tree`` on every rank (leaves of the same shape and dtype)."""
        if self.size == 1:
            return tree
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        out = []
        for leaf in leaves:
            buf = np.array(leaf, copy=True, order="C")  # a writable host copy
            self.comm.Bcast(buf, root=0)
            out.append(jnp.asarray(buf))
        return jax.tree_util.tree_unflatten(treedef, out)

    def check_same(self, tree, what: str = "parameters"):
        """Raises on every rank unless all ranks hold bit-identical ``tree``s."""
        if self.size == 1:
            return
        digest = 0
        for leaf in jax.tree_util.tree_leaves(tree):
            digest = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), digest)
        digests = self.comm.allgather(digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different {what} (crc32 per rank: {digests})")

    def background_sum(self):
        """A blocking in-place float32 sum over ranks for ``nonblocking.Exchanger``'s background thread, on its
        own clone of the communicator (None on one rank). It runs while mpi4jax calls MPI from XLA's thread, so
        MPI must provide MPI_THREAD_MULTIPLE; anything less is a clear error. Collective (the clone)."""
        if self.size == 1:
            return None
        from mpi4py import MPI

        level = MPI.Query_thread()
        if level != MPI.THREAD_MULTIPLE:
            names = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED", MPI.THREAD_SERIALIZED: "SERIALIZED"}
            raise RuntimeError(
                f"train.overlap=True needs MPI_THREAD_MULTIPLE (a thread sums the head's gradients "
                f"while XLA's thread runs mpi4jax), but this MPI gives MPI_THREAD_"
                f"{names.get(level, level)}; use an MPI built with thread support, or "
                f"train.overlap=False"
            )
        comm = self.comm.Clone()

        def total(buf):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return buf

        return total

    # --- inside jit ---------------------------------------------------------------------------------------
    def allreduce_sum(self, buf: jax.Array) -> jax.Array:
        """The sum over ranks of a flat float32 buffer, with one mpi4jax allreduce (inside jit)."""
        if self.size == 1:
            return buf
        import mpi4jax
        from mpi4py import MPI

        return mpi4jax.allreduce(buf, op=MPI.SUM, comm=self.jax_comm)

    def allgather(self, buf: jax.Array) -> jax.Array:
        """Every rank's flat float32 buffer, stacked [ranks, n], with one mpi4jax allgather (inside jit)."""
        if self.size == 1:
            return buf[None]
        import mpi4jax

        return mpi4jax.allgather(buf, comm=self.jax_comm)

    def time_comm(self, allreduce: int, allgather: int = 0, allreduce_p: int = 0) -> float:
        """Seconds the step's collectives take, measured apart from the train step: packed allreduces of
        ``allreduce_p`` (PowerSGD's P's, if any) and ``allreduce`` float32 elements and an allgather of an
        ``allgather``-element block per rank (if any), as ``comm.Plan.sizes`` gives them. The ranks first meet at
        a barrier (so waiting for a slower rank's compute is not counted), then one jitted function doing them
        runs and is waited for: the cost of the step's communication alone, with no overlap. Collective: every
        rank must call it at the same steps. 0.0 on one rank (nothing to send)."""
        if self.size == 1:
            return 0.0
        ops = [
            (n, op)
            for n, op in (
                (allreduce_p, self.allreduce_sum),
                (allreduce, self.allreduce_sum),
                (allgather, self.allgather),
            )
            if n > 0
        ]
        key = (allreduce_p, allreduce, allgather)
        bufs = [jnp.zeros((n,), jnp.float32) for n, _ in ops]
        fn = self._timed_allreduce.get(key)
        if fn is None:
            fn = self._timed_allreduce[key] = jax.jit(lambda bs: [op(b) for (_, op), b in zip(ops, bs)])
            jax.block_until_ready(fn(bufs))  # compile (and warm) outside the timing
        self.barrier()
        t0 = time.perf_counter()
        jax.block_until_ready(fn(bufs))
        return time.perf_counter() - t0

    def abort(self, code: int = 1):
        """Ends every rank of the job now (after this rank's error has been printed)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size > 1:
            time.sleep(1.0)  # let the launcher forward what this rank printed before it tears the job down
            self.comm.Abort(code)
        os._exit(code)


_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID")


def launched_by_mpi() -> bool:
    """True when started by mpiexec / srun (their process managers set one of these variables)."""
    return os.environ.get("MCNN_MPI") == "1" or any(v in os.environ for v in _LAUNCHER_VARS)


def init_world() -> World:
    """The MPI world when launched by mpiexec, else a single-rank world that never imports MPI."""
    if not launched_by_mpi():
        return World()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return World(comm=comm)
    return World(rank=comm.Get_rank(), size=comm.Get_size(), comm=comm, jax_comm=comm.Clone())


def fail_fast(world: World):
    """Installs an excepthook: an uncaught exception on any rank prints its traceback and aborts the job.

    Without it, the other ranks would wait forever in the next allreduce.
    """
    if world.size == 1:
        return

    def hook(exc_type, exc, tb):
        sys.stderr.write(
            f"[rank {world.rank}/{world.size}] failed; stopping the whole job:\n"
            + "".join(traceback.format_exception(exc_type, exc, tb))
        )
        world.abort(1)

    sys.excepthook = hook
