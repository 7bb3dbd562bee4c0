"""Compile time of the tiny config's train step at XLA's default backend optimisation level and at level 0 (what
tests/conftest.py sets for the test suite), each in fresh subprocesses without a compilation cache; JSON out.

    python benchmarks/compile_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp, optax
from mcnn_jax.config import load_config
from mcnn_jax.model.mcnn import from_config, init_params
from mcnn_jax.step import create_state, make_train_step
c = load_config("configs/tiny.py")
model = from_config(c.model, num_classes=4)
t = time.perf_counter(); params = init_params(model, jax.random.key(0), (128, 128, 3)); init_s = time.perf_counter() - t
tx = optax.sgd(0.1, momentum=0.9)
state = create_state(params, tx, 0)
batch = dict(image=jnp.zeros((8, 128, 128, 3)), label=jnp.zeros(8, jnp.int32))
t = time.perf_counter()
step = make_train_step(model, tx, 4).lower(state, batch).compile()
compile_s = time.perf_counter() - t
t = time.perf_counter(); jax.block_until_ready(step(state, batch)); run_s = time.perf_counter() - t
print(json.dumps(dict(init_s=init_s, compile_s=compile_s, run_s=run_s)))
"""


def child(flags: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["XLA_FLAGS"] = flags
    env["MCNN_COMPILATION_CACHE"] = "0"
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    runs = {"default": [], "level0": []}
    for _ in range(a.repeats):  # interleaved, so that the machine's load falls on both alike
        runs["default"].append(child(""))
        runs["level0"].append(child("--xla_backend_optimization_level=0"))
    best = {k: {m: round(min(r[m] for r in v), 2) for m in ("init_s", "compile_s", "run_s")} for k, v in runs.items()}
    total = {k: v["init_s"] + v["compile_s"] for k, v in best.items()}
    print(
        json.dumps(
            dict(
                benchmark="compile_time",
                what="configs/tiny.py train step: jitted init + compile (best of repeats)",
                best=best,
                level0_over_default=round(total["level0"] / total["default"], 3),
                runs=runs,
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
