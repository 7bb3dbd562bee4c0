"""Run under ``mpiexec -n 2`` by tests/test_comm.py: 5 train steps of the tiny M-CNN (each rank its own random
images) with every exchange scheme, and with ``train.overlap`` (the head's sum on a background thread), with LARS
and Nesterov; rank 0 writes, per optimizer and scheme, the largest relative difference of the parameters from the
plain allreduce's, and the plan, as JSON to argv[1]."""

import json
import sys

import jax
import numpy as np

from mcnn_jax import optim
from mcnn_jax.config import load_config
from mcnn_jax.model.mcnn import from_config, init_params
from mcnn_jax.parallel import exchange
from mcnn_jax.parallel.nonblocking import Exchanger
from mcnn_jax.parallel.world import fail_fast, init_world
from mcnn_jax.step import create_state, make_train_step

STEPS, LOCAL = 5, 4
world = init_world()
fail_fast(world)
assert world.size == 2, world
cfg = load_config("configs/tiny.py")
model = from_config(cfg.model, num_classes=4)
params = jax.device_get(world.bcast_tree(init_params(model, jax.random.key(0), (128, 128, 3))))
rng = np.random.default_rng(10 + world.rank)
batches = [
    dict(image=rng.random((LOCAL, 128, 128, 3), dtype=np.float32), label=rng.integers(0, 4, LOCAL).astype(np.int32))
    for _ in range(STEPS)
]


def run(optimizer: str, scheme: str, rank: int = 4, exchanger=None, microbatch: int = 0):
    c = cfg.optim.copy_and_resolve_references()
    c.name = optimizer
    # a large constant learning rate (and LARS trust coefficient), so that the parameters move by far more
    # than float32 rounding in 5 steps and a wrong gradient shows
    c.base_lr, c.warmup_epochs, c.decay, c.trust_coefficient = 0.5, 0.0, "constant", 0.05
    schedule = optim.make_schedule(c, 4, 2 * LOCAL)
    tx = optim.make_optimizer(c, schedule)
    plan = exchange.make_plan(scheme, params, LOCAL, world.size, rank)
    step = make_train_step(
        model,
        tx,
        4,
        c.label_smoothing,
        allreduce=world.allreduce_sum,
        num_ranks=2,
        schedule=schedule,
        plan=plan,
        allgather=world.allgather,
        exchanger=exchanger,
        microbatch=microbatch,
    )
    state = create_state(jax.tree_util.tree_map(jax.numpy.array, params), tx, 0, plan)  # a copy: it is donated
    for b in batches:
        state, metrics = step(state, b)
    assert float(metrics["count"]) == 2 * LOCAL, metrics
    world.check_same(state.params, f"parameters after {scheme}")
    return jax.device_get(state.params), plan


def rel(a, b, kernels_only=False):
    return max(
        float(np.abs(x - y).max() / (np.abs(y).max() + 1e-12))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
        if y.ndim > 1 or not kernels_only
    )


out = {}
exchanger = Exchanger(world.background_sum())
for optimizer in ("lars", "nesterov"):
    ref, _ = run(optimizer, "allreduce")
    start = rel(ref, params, kernels_only=True)  # how far the kernels moved from the initial ones
    for scheme, rank in (("factored", 4), ("auto", 4), ("powersgd", 1)):
        p, plan = run(optimizer, scheme, rank)
        out[f"{optimizer}/{scheme}/{rank}"] = dict(
            rel=rel(p, ref), moved=start, factored=["/".join(la.path) for la in plan.factored]
        )
    for scheme, microbatch in (("allreduce", 0), ("auto", 2)):  # overlapped: the same parameters
        p, _ = run(optimizer, scheme, exchanger=exchanger, microbatch=microbatch)
        out[f"{optimizer}/overlap/{scheme}/{microbatch}"] = dict(rel=rel(p, ref), moved=start)
exchanger.close()
if world.is_primary:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
