"""Where the time of one M-CNN training step goes, by layer and by pass (JSON out).

Every layer of the M-CNN is timed as its own jitted function at its real shape (full resolution by default):
each branch convolution (conv + bias + ReLU) forward, its VJP (all of it), and separately the input gradient
(dx) and the kernel gradient (dk); each branch's post-pool forward and VJP; the merge 1x1 conv, the dense
layers. Then the whole jitted train step (mcnn_jax.step.make_train_step) is timed for comparison with the
sum of the parts. A matmul peak is measured right before each row, and every row carries its ratio to it.

    python benchmarks/profile_step.py                          # batch 1, impl xla, fast and native, ~5-8 min
    python benchmarks/profile_step.py --impls xla --batch 2 --out prof.json
    python benchmarks/profile_step.py --height 256 --width 256  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcnn_jax import MCNN, mcnn_flops
from mcnn_jax.model import layers, xla_conv


def timeit(fn, *args, reps: int = 3, warmup: int = 1) -> float:
    """Best wall time (s) of ``fn(*args)`` over ``reps`` runs, after ``warmup`` runs (which compile)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


_PEAK = {}


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """fp32 matmul GFLOP/s in JAX: an n x n x n matmul, best of ``reps`` (call it right before each timing)."""
    import jax
    import jax.numpy as jnp

    if n not in _PEAK:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        _PEAK[n] = (jax.jit(lambda x, y: x @ y), a)
    f, a = _PEAK[n]
    return 2 * n**3 / timeit(f, a, a, reps=reps) / 1e9


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program: ``VmHWM`` of /proc/self/status (Linux).
    ``ru_maxrss`` is not that in a child process: Linux carries the parent's resident size at the fork over the
    exec (a child of a 0.8 GB parent reports 0.8 GB at its first line), so a benchmark's workers read this."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict:
    import flax
    import jax
    import jaxlib
    import numpy

    cpu = platform.processor()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and (not cpu or cpu == "x86_64"):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
    except OSError:
        pass
    isa = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f" {x}" in flags]
    return dict(
        cpu=cpu,
        isa=isa,
        logical_cores=os.cpu_count(),
        affinity_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        flax=flax.__version__,
        numpy=numpy.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        python=platform.python_version(),
    )


def conv_fn(impl):
    """The convolution alone (no bias, no ReLU), for timing its input and kernel gradients separately."""
    return lambda x, kernel: layers.conv_bias(x, kernel, 0.0, impl)


def pool_fn(impl, f):
    return lambda x: layers.max_pool(x, f, impl)


def row(name, pass_, seconds, flops, peak):
    gf = flops / seconds / 1e9 if flops else None
    return dict(
        layer=name,
        pass_=pass_,
        seconds=round(seconds, 5),
        gflop=round(flops / 1e9, 3),
        gflops=round(gf, 1) if gf else None,
        peak_gflops=round(peak, 1),
        ratio_to_peak=round(gf / peak, 3) if gf else None,
    )


def profile(model: MCNN, impl: str, batch: int, h: int, w: int, reps: int, out: list, quiet: bool):
    key = jax.random.key(0)
    conv = conv_fn(impl)
    k = model.kernel_size

    def emit(r):
        r["impl"] = impl
        out.append(r)
        if not quiet:
            print(json.dumps(r), flush=True)

    for b, (f, width, post) in enumerate(zip(model.pool_factors, model.widths, model.post_pools)):
        hb, wb, cin = h // f, w // f, 3
        for j in range(model.convs_per_branch):
            x = jax.random.uniform(key, (batch, hb, wb, cin), jnp.float32)
            kern = jax.random.normal(key, (k, k, cin, width), jnp.float32) * 0.05
            bias = jnp.zeros((width,), jnp.float32)
            ct = jax.random.normal(key, (batch, hb, wb, width), jnp.float32)
            # the layer as the model runs it (for "native": conv + bias + ReLU fused in the kernels)
            layer = lambda x, kern, bias: layers.conv_bias(x, kern, bias, impl, relu=True)  # noqa: E731
            fl = 2 * k * k * cin * width * hb * wb * batch
            name = f"branch{b}/conv{j}"
            emit(row(name, "forward", timeit(jax.jit(layer), x, kern, bias, reps=reps), fl, matmul_peak()))
            if j == 0:  # the image is not differentiated
                vjp = jax.jit(lambda x, kern, bias, ct: jax.vjp(lambda p, q: layer(x, p, q), kern, bias)[1](ct))
                emit(row(name, "vjp", timeit(vjp, x, kern, bias, ct, reps=reps), fl, matmul_peak()))
            else:
                vjp = jax.jit(lambda x, kern, bias, ct: jax.vjp(layer, x, kern, bias)[1](ct))
                emit(row(name, "vjp", timeit(vjp, x, kern, bias, ct, reps=reps), 2 * fl, matmul_peak()))
                dx = jax.jit(lambda x, kern, ct: jax.vjp(lambda p: conv(p, kern), x)[1](ct))
                emit(row(name, "dx", timeit(dx, x, kern, ct, reps=reps), fl, matmul_peak()))
            dk = jax.jit(lambda x, kern, ct: jax.vjp(lambda p: conv(x, p), kern)[1](ct))
            emit(row(name, "dk", timeit(dk, x, kern, ct, reps=reps), fl, matmul_peak()))
            cin = width
        y = jax.random.uniform(key, (batch, hb, wb, width), jnp.float32)
        pool = pool_fn(impl, post)
        emit(row(f"branch{b}/post_pool{post}", "forward", timeit(jax.jit(pool), y, reps=reps), 0, matmul_peak()))
        ctp = jnp.ones((batch, hb // post, wb // post, width), jnp.float32)
        pvjp = jax.jit(lambda y, c: jax.vjp(pool, y)[1](c))
        emit(row(f"branch{b}/post_pool{post}", "vjp", timeit(pvjp, y, ctp, reps=reps), 0, matmul_peak()))
        if f > 1:
            img = jax.random.uniform(key, (batch, h, w, 3), jnp.float32)
            emit(
                row(
                    f"branch{b}/pre_pool{f}",
                    "forward",
                    timeit(jax.jit(pool_fn(impl, f)), img, reps=reps),
                    0,
                    matmul_peak(),
                )
            )
    total = f * post
    hm, wm, cm = h // total, w // total, sum(model.widths)
    x = jax.random.uniform(key, (batch, hm, wm, cm))
    kern = jax.random.normal(key, (1, 1, cm, model.merge_width)) * 0.05
    ct = jnp.ones((batch, hm, wm, model.merge_width))
    fl = 2 * cm * model.merge_width * hm * wm * batch
    merge = lambda x, kern: nn.relu(xla_conv.conv_xla(x, kern))  # noqa: E731
    emit(row("merge", "forward", timeit(jax.jit(merge), x, kern, reps=reps), fl, matmul_peak()))
    emit(
        row(
            "merge",
            "vjp",
            timeit(jax.jit(lambda x, kern, ct: jax.vjp(merge, x, kern)[1](ct)), x, kern, ct, reps=reps),
            2 * fl,
            matmul_peak(),
        )
    )
    nin = hm // model.merge_pool * wm // model.merge_pool * model.merge_width
    x = jax.random.uniform(key, (batch, nin))
    wd = jax.random.normal(key, (nin, model.head_width)) * 0.01
    ct = jnp.ones((batch, model.head_width))
    fl = 2 * nin * model.head_width * batch
    emit(row("hidden", "forward", timeit(jax.jit(lambda x, wd: x @ wd), x, wd, reps=reps), fl, matmul_peak()))
    emit(
        row(
            "hidden",
            "vjp",
            timeit(jax.jit(lambda x, wd, ct: jax.vjp(lambda a, b: a @ b, x, wd)[1](ct)), x, wd, ct, reps=reps),
            2 * fl,
            matmul_peak(),
        )
    )


def time_step(model, batch, h, w, steps, num_classes=13):
    """Seconds per step of the real jitted train step (SGD-Nesterov), best of ``steps``."""
    import time

    import optax

    from mcnn_jax.model.mcnn import init_params
    from mcnn_jax.step import create_state, make_train_step

    params = init_params(model, jax.random.key(0), (h, w, 3))
    tx = optax.chain(optax.add_decayed_weights(5e-5), optax.sgd(1e-3, momentum=0.9, nesterov=True))
    state = create_state(params, tx, 0)
    step = make_train_step(model, tx, num_classes)
    batch_ = dict(
        image=jax.random.uniform(jax.random.key(1), (batch, h, w, 3)),
        label=jnp.arange(batch, dtype=jnp.int32) % num_classes,
    )
    state, m = step(state, batch_)
    jax.block_until_ready(m)
    best = float("inf")
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch_)
        jax.block_until_ready(m)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--impls", default="xla,fast,native")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed train steps per impl (0 = skip)")
    p.add_argument("--out", default="", help="JSON file (default: stdout only)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    rows, steps = [], []
    for impl in a.impls.split(","):
        model = MCNN(num_classes=13, impl=impl)
        profile(model, impl, a.batch, a.height, a.width, a.reps, rows, a.quiet)
        if a.steps:
            pk = matmul_peak()
            t = time_step(model, a.batch, a.height, a.width, a.steps)
            fl = mcnn_flops(model, a.height, a.width)["train"] * a.batch
            steps.append(
                dict(
                    impl=impl,
                    seconds=round(t, 4),
                    images_per_s=round(a.batch / t, 3),
                    gflops=round(fl / t / 1e9, 1),
                    peak_gflops=round(pk, 1),
                    ratio_to_peak=round(fl / t / 1e9 / pk, 3),
                )
            )
            if not a.quiet:
                print(json.dumps(steps[-1]), flush=True)
    summary = {}
    for r in rows:
        s = summary.setdefault(r["impl"], {})
        if r["pass_"] in ("forward", "vjp"):
            grp = r["layer"].split("/")[0] if "/" in r["layer"] else "head"
            s[grp] = round(s.get(grp, 0.0) + r["seconds"], 4)
    result = dict(
        machine=machine(),
        batch=a.batch,
        height=a.height,
        width=a.width,
        layers=rows,
        seconds_by_group=summary,
        train_step=steps,
    )
    text = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(json.dumps(dict(seconds_by_group=summary, train_step=steps), indent=1))


if __name__ == "__main__":
    main()
