"""Run under mpiexec -n 2 by tests/test_mpi.py: rank 1 raises while rank 0 waits in an allreduce inside a
jitted step, as a rank whose data or code fails mid-training would. The job must end, not hang."""

import time

import jax
import jax.numpy as jnp

from mcnn_jax.parallel.world import fail_fast, init_world

world = init_world()
fail_fast(world)
assert world.size == 2, world
step = jax.jit(world.allreduce_sum)
print(f"rank {world.rank} ok: {float(step(jnp.ones(4))[0])}", flush=True)  # 2.0
if world.rank == 1:
    time.sleep(1)
    raise RuntimeError("rank 1 could not read images/bad.tif")
step(jnp.ones(4)).block_until_ready()  # rank 0 is stuck here until the job is aborted
time.sleep(600)
