"""Max-pool forward + gradient at the M-CNN's shapes: ``mcnn_jax.model.pool.fast_max_pool`` against XLA's
``reduce_window``
max-pool (``flax.linen.max_pool``, what ``impl="xla"`` runs) and against the one-pass mask that sent the output
gradient to EVERY tied maximum (the form before issue 10: wrong on flat fields, kept here only as the cost to
beat). All three are timed interleaved in one process, so their ratios hold on a shared machine. JSON out.

    python benchmarks/bench_pool.py                 # batch 2, the pools of branch 0, 1, the image, the merge
    python benchmarks/bench_pool.py --batch 8 --reps 7
    python benchmarks/bench_pool.py --step --batch 4 --reps 4   # the whole default train step, A/B

``--step`` times the real train step of the default model (1024x1280x3, 13 classes, SGD-Nesterov) built twice,
once with ``pool.fast_max_pool`` and once with the old all-ties form swapped in, alternating A, B, A, B, ... so
that a change in the machine's load hits both alike; it reports the ratio of the median step times.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcnn_jax.model import pool

# (name, [h, w, c] of the pooled tensor, f): branch0's post-pool, branch1's, the image pre-pool, the merge pool
SHAPES = [
    ("branch0_post_pool64", (1024, 1280, 16), 64),
    ("branch1_post_pool32", (512, 640, 16), 32),
    ("image_pre_pool2", (1024, 1280, 3), 2),
    ("merge_pool2", (16, 20, 1024), 2),
]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def all_ties(x, f):
    n, h, w, c = x.shape
    return x.reshape(n, h // f, f, w // f, f, c).max(axis=(2, 4))


def _all_ties_fwd(x, f):
    y = all_ties(x, f)
    return y, (x, y)


def _all_ties_bwd(f, res, ct):
    x, y = res
    n, h, w, c = x.shape
    hit = x.reshape(n, h // f, f, w // f, f, c) == y[:, :, None, :, None, :]
    return (jnp.where(hit, ct[:, :, None, :, None, :], 0).reshape(x.shape),)


all_ties.defvjp(_all_ties_fwd, _all_ties_bwd)

FORMS = {
    "pool": pool.fast_max_pool,
    "xla": lambda x, f: nn.max_pool(x, (f, f), strides=(f, f)),
    "all_ties_old": all_ties,
}


def step_ab(batch: int, reps: int) -> dict:
    """Median train-step seconds of the default model with pool.fast_max_pool and with the old all-ties pool."""
    import optax

    from mcnn_jax import MCNN
    from mcnn_jax.model.mcnn import init_params
    from mcnn_jax.step import create_state, make_train_step

    model = MCNN(num_classes=13)
    tx = optax.sgd(0.001, momentum=0.9, nesterov=True)
    params = init_params(model, jax.random.key(0))
    data = dict(
        image=jax.random.uniform(jax.random.key(1), (batch, 1024, 1280, 3)),
        label=jnp.arange(batch, dtype=jnp.int32) % 13,
    )
    steps, states, real = {}, {}, pool.fast_max_pool
    for name, fn in (("pool", real), ("all_ties_old", all_ties)):
        states[name] = create_state(jax.tree_util.tree_map(jnp.copy, params), tx, 0)  # the step donates it
        pool.fast_max_pool = fn  # looked up when the step is traced (mcnn_jax.model.layers calls pool.fast_max_pool)
        try:
            steps[name] = make_train_step(model, tx, 13).lower(states[name], data).compile()
        finally:
            pool.fast_max_pool = real
    times = {k: [] for k in steps}
    for i in range(reps + 1):  # the first round warms up and is not counted
        for k, fn in steps.items():
            t = time.perf_counter()
            states[k] = jax.block_until_ready(fn(states[k], data))[0]
            if i:
                times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return dict(
        batch=batch,
        reps=reps,
        step_s={k: [round(x, 3) for x in v] for k, v in times.items()},
        median_s={k: round(v, 3) for k, v in med.items()},
        pool_over_all_ties_old=round(med["pool"] / med["all_ties_old"], 4),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--step", action="store_true", help="A/B the whole train step instead of the pools alone")
    a = p.parse_args(argv)
    if a.step:
        print(json.dumps(dict(step_ab(a.batch, a.reps), load_average=list(os.getloadavg())), indent=1))
        return
    rows = []
    for name, shape, f in SHAPES:
        x = jnp.asarray(np.random.default_rng(0).random((a.batch, *shape), np.float32))
        fns = {k: jax.jit(jax.grad(lambda x, fn=fn: (fn(x, f) * 1.3).sum())) for k, fn in FORMS.items()}
        times = {k: [] for k in fns}
        for fn in fns.values():
            fn(x).block_until_ready()
        for _ in range(a.reps):  # interleaved, so load changes hit every form alike
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(x).block_until_ready()
                times[k].append(time.perf_counter() - t)
        best = {k: min(v) for k, v in times.items()}
        rows.append(
            dict(
                shape=name,
                batch=a.batch,
                best_ms={k: round(v * 1e3, 2) for k, v in best.items()},
                pool_over_xla=round(best["pool"] / best["xla"], 3),
                pool_over_all_ties_old=round(best["pool"] / best["all_ties_old"], 3),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(dict(rows=rows, load_average=list(os.getloadavg())), indent=1))


if __name__ == "__main__":
    main()
