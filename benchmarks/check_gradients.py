"""The default model's gradients at full resolution, on a microscopy-like field: every leaf against plain XLA
(float32) and against the float64 gradient. Prints JSON; exits 1 if a check fails.

    python benchmarks/check_gradients.py                           # 1024x1280, flat field with saturated objects
    python benchmarks/check_gradients.py --kind 8bit_zero_border --impls native,fast

At this size float32 rounding decides which of two nearly equal maxima a pool window picks, so the plain
float32 XLA gradient itself differs from the float64 one (per leaf, relative to the leaf's largest entry; up
to ~5e-3 measured on the flat field). The checks: each form's gradient is as close to the float64 one as plain
float32 XLA's is (x1.5 + 1e-4), and within 1e-2 of plain float32 XLA's. (The unit tests make the same
comparison at 128x256 with a 1e-4 bound: tests/test_realistic_fields.py.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fields import KINDS, fields  # noqa: E402

from mcnn_jax import MCNN


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def grads(model, params, x, y):
    def loss(p, x):
        return -jax.nn.log_softmax(model.apply({"params": p}, x))[jnp.arange(len(y)), y].mean()

    return jax.jit(jax.grad(loss))(params, x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="flat_saturated", choices=KINDS)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--impls", default="native,fast")
    p.add_argument("--bias-shift", type=float, default=0.05, help="added to every bias (ties above 0)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    x = jnp.asarray(fields(a.kind, 1, a.height, a.width, 3))
    y = jnp.array([2])
    plain = MCNN(num_classes=4, impl="xla")
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + a.bias_shift if jax.tree_util.keystr(path).endswith("['bias']") else v,
        plain.init(jax.random.key(0), x)["params"],
    )
    g32 = grads(plain, params, x, y)
    with jax.enable_x64(True):
        g64 = grads(
            MCNN(num_classes=4, impl="xla", dtype=jnp.float64),
            jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), params),
            jnp.asarray(x, jnp.float64),
            y,
        )
    leaves64 = jax.tree_util.tree_leaves_with_path(g64)
    out, ok = dict(kind=a.kind, size=[a.height, a.width], leaves=len(leaves64), impls={}), True
    xla_vs_64 = [rel_err(b, r) for (_, r), b in zip(leaves64, jax.tree_util.tree_leaves(g32))]
    out["xla32_vs_float64_worst"] = max(xla_vs_64)
    for impl in a.impls.split(","):
        g = jax.tree_util.tree_leaves(grads(MCNN(num_classes=4, impl=impl), params, x, y))
        vs64 = [rel_err(b, r) for (_, r), b in zip(leaves64, g)]
        vs32 = [rel_err(b, c) for b, c in zip(g, jax.tree_util.tree_leaves(g32))]
        bad = [
            jax.tree_util.keystr(path)
            for (path, _), e, ref, e32 in zip(leaves64, vs64, xla_vs_64, vs32)
            if e > 1.5 * ref + 1e-4 or e32 >= 1e-2
        ]
        ok &= not bad
        out["impls"][impl] = dict(vs_float64_worst=max(vs64), vs_xla32_worst=max(vs32), failing_leaves=bad)
    out.update(ok=ok, seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(out, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
