"""Time per image of exact streaming against the unstreamed model, interleaved A/B in one process.

For each field size, one process builds the published M-CNN with ``model.head="global_max"`` (the published
"flatten" head grows with the field) unstreamed and with each ``--tiles`` value (``model.stream_tile``, branches
0-2), their real jitted train steps at local batch 1, compiles them all, then times ``--rounds`` rounds in which
each variant runs one step in turn (A, B, C, A, B, C, ...), so a shared, noisy machine slows every variant alike.
Reported per variant: the median step time and the median over rounds of (its step time / the unstreamed step's
in the same round), with the halo's share of extra convolution FLOPs (``model.stream.halo_overhead``). Prints JSON.

    python benchmarks/stream_speed.py                                        # 1024x1280, 2048x2560 (~6 min)
    python benchmarks/stream_speed.py --sizes 4096x5120 --rounds 3 --out s.json
    python benchmarks/stream_speed.py --sizes 1024x1280 --tiles 256 --probe    # and where the time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import emit  # noqa: E402
from profile_step import machine  # noqa: E402

from mcnn_jax import optim  # noqa: E402
from mcnn_jax.config import base_config  # noqa: E402
from mcnn_jax.model.mcnn import from_config, init_params  # noqa: E402
from mcnn_jax.model.stream import halo_overhead  # noqa: E402
from mcnn_jax.step import create_state, make_train_step  # noqa: E402

# --probe: where the time goes; branches 0-2 rematerialised without tiles, and branch 0 alone streamed
PROBES = {
    "remat_0_2": dict(remat=(True,) * 3 + (False,) * 4),
    "tile256_branch0": dict(stream_tile=256, stream_branches=1),
}


def build(model_keys: dict, h: int, w: int):
    c = base_config()
    c.model.head, c.model.stream_branches = "global_max", 3
    model = from_config({**c.model, **model_keys}, num_classes=13)
    tx = optim.make_optimizer(c.optim, optax.constant_schedule(1e-3))
    state = create_state(init_params(model, jax.random.key(0), (h, w, 3)), tx, 0)
    return model, make_train_step(model, tx, 13), state


def run_size(h: int, w: int, tiles: list[int], rounds: int, probe: bool = False) -> dict:
    image = np.random.default_rng(1).integers(0, 256, (1, h, w, 3), dtype=np.uint8)  # an 8-bit field
    batch = dict(image=jnp.asarray(image).astype(jnp.float32) / 255.0, label=jnp.zeros(1, jnp.int32))
    named = {"unstreamed": {}, **{f"tile{t}": dict(stream_tile=t) for t in tiles}, **(PROBES if probe else {})}
    variants = {}
    for name, keys in named.items():
        model, step, state = build(keys, h, w)
        t = time.perf_counter()
        state, m = step(state, batch)  # compiles
        jax.block_until_ready(m)
        variants[name] = dict(model=model, step=step, state=state, compile_s=time.perf_counter() - t, times=[])
    for _ in range(rounds):
        for v in variants.values():
            t = time.perf_counter()
            v["state"], m = v["step"](v["state"], batch)
            jax.block_until_ready(m)
            v["times"].append(time.perf_counter() - t)
    base = variants["unstreamed"]["times"]
    rows = []
    for name, v in variants.items():
        rows.append(
            dict(
                variant=name,
                model=named[name],
                first_step_s=round(v["compile_s"], 2),
                step_s=[round(t, 3) for t in v["times"]],
                median_step_s=round(statistics.median(v["times"]), 3),
                time_vs_unstreamed=round(statistics.median(t / b for t, b in zip(v["times"], base)), 3),
                halo_flops_overhead=round(halo_overhead(v["model"], h, w), 3),
            )
        )
    return dict(size=f"{h}x{w}", rounds=rounds, rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024x1280,2048x2560")
    p.add_argument("--tiles", default="256,512", help="stream tiles to time against the unstreamed model")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--probe", action="store_true", help="also " + ", ".join(PROBES) + " (where the time goes)")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    tiles = [int(t) for t in a.tiles.split(",")]
    sizes = []
    for size in a.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        sizes.append(run_size(h, w, tiles, a.rounds, a.probe))
        print(json.dumps(sizes[-1]), file=sys.stderr, flush=True)
    emit(dict(benchmark="stream_speed", machine=machine(), sizes=sizes), a.out)


if __name__ == "__main__":
    main()
