"""M-CNN training speed and memory at full resolution (1024x1280x3, 13 classes), one command, JSON out.

For every (variant, batch size) a fresh subprocess builds the model, the real jitted train step
(``mcnn_jax.step.make_train_step`` with SGD-Nesterov from ``mcnn_jax.optim``), compiles it, runs one warm-up step
and times ``--steps`` steps; its peak resident memory (``VmHWM``, ``profile_step.peak_rss_bytes``) is then its own.
A fp32 matmul peak (2048^3, best of 5, in JAX) is measured in the same process right before and right after the
timed steps, and the achieved GFLOP/s (``mcnn_flops(model)["train"]`` per image) is reported as a ratio to it: the
machine may be shared, and the ratio is what compares across runs. The parent watches each child's memory and kills
it above ``--max-rss-gb``; a batch is skipped when the machine has not that much memory available.

Variants (comma-separated, ``--variants``):
    xla        the plain model: XLA convolutions and pools (MCNN(impl="xla")); aborts (std::bad_alloc in
               XLA:CPU's convolution) at batch > 4 at full resolution
    fast       XLA convolutions with mcnn_jax.model.xla_conv's kernel gradients and mcnn_jax.model.pool's pools
    (MCNN(impl="fast"))
    base       the default model: MCNN() (impl="native": the C++ kernels of mcnn_jax.model.native)
    remat      base + rematerialisation of every branch (remat=True)
    remat0     base + rematerialisation of the full-resolution branch only (remat=(True,)+(False,)*6)
    bf16       base + bfloat16 compute (dtype="bfloat16"; parameters stay float32)
    xla_remat  xla + remat=True
    stream256  base + exact streaming of branches 0-2 in tiles of 256 pixels (model.stream_tile=256)
    stream512  base + exact streaming in tiles of 512

    python benchmarks/bench_train.py                      # quick: batch 1, variants xla,base, 2 steps (~3 min)
    python benchmarks/bench_train.py --batch 1,4,16 --variants xla,base,remat,remat0,bf16 --steps 3 \\
        --out bench_train.json                            # the full run (~30-40 min on 2 cores; 17 GB max)
    python benchmarks/bench_train.py --xla-flags=--xla_cpu_use_xnnpack=true   # with XLA flags for the children
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "xla": dict(impl="xla"),
    "fast": dict(impl="fast"),
    "base": dict(),
    "remat": dict(remat=True),
    "remat0": dict(remat=(True, False, False, False, False, False, False)),
    "bf16": dict(dtype="bfloat16"),
    "xla_remat": dict(impl="xla", remat=True),
    "remat_bf16": dict(remat=True, dtype="bfloat16"),
    "stream256": dict(stream_tile=256),
    "stream512": dict(stream_tile=512),
}


def worker(a) -> dict:
    import jax
    import jax.numpy as jnp
    from profile_step import machine, matmul_peak, peak_rss_bytes

    from mcnn_jax import mcnn_flops
    from mcnn_jax.config import base_config
    from mcnn_jax.model.mcnn import from_config, init_params
    from mcnn_jax.optim import make_optimizer
    from mcnn_jax.step import create_state, make_train_step

    kw = dict(VARIANTS[a.variant])
    model = from_config(kw, num_classes=13)
    peak0 = matmul_peak()
    rss_runtime = peak_rss_bytes() / 2**30
    ocfg = base_config().optim  # the published recipe: Nesterov 0.9, weight decay 5e-5
    tx = make_optimizer(ocfg, lambda step: 1e-3)
    params = init_params(model, jax.random.key(0), (a.height, a.width, 3))
    state = create_state(params, tx, 0)
    del params
    step = make_train_step(model, tx, 13, microbatch=a.microbatch)
    batch = dict(
        image=jax.random.uniform(jax.random.key(1), (a.batch_size, a.height, a.width, 3)),
        label=jnp.arange(a.batch_size, dtype=jnp.int32) % 13,
    )
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    rss = peak_rss_bytes() / 2**30
    peak1 = matmul_peak()
    peak = max(peak0, peak1)
    flops = mcnn_flops(model, a.height, a.width)["train"] * a.batch_size
    best, med = min(times), sorted(times)[len(times) // 2]
    return dict(
        variant=a.variant,
        model_overrides={k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
        batch=a.batch_size,
        microbatch=a.microbatch or a.batch_size,
        steps=a.steps,
        first_step_s=round(first, 2),
        step_s_best=round(best, 3),
        step_s_median=round(med, 3),
        images_per_s=round(a.batch_size / best, 3),
        images_per_s_median=round(a.batch_size / med, 3),
        gflops=round(flops / best / 1e9, 1),
        matmul_peak_gflops=round(peak, 1),
        matmul_peak_before_after=[round(peak0, 1), round(peak1, 1)],
        ratio_to_peak=round(flops / best / 1e9 / peak, 3),
        ratio_to_peak_median=round(flops / med / 1e9 / peak, 3),
        peak_rss_gb=round(rss, 3),
        runtime_rss_gb=round(rss_runtime, 3),
        gb_per_image=round(rss / a.batch_size, 3),
        loss_finite=bool(jnp.isfinite(m["loss_sum"])),
        machine=machine(),
    )


def run_child(variant, b, a, microbatch: int = 0) -> dict:
    """Runs one (variant, batch[, micro-batch]) in a fresh subprocess; its result, or why it was skipped/failed."""
    import psutil

    need = a.est_gb_per_image * (microbatch or b) + 0.5 + 4 * b * a.height * a.width * 3 / 2**30
    avail = psutil.virtual_memory().available / 2**30
    if need > min(avail - 1.0, a.max_rss_gb):
        return dict(
            variant=variant,
            batch=b,
            microbatch=microbatch or b,
            skipped=f"needs ~{need:.1f} GB, {avail:.1f} GB available, limit {a.max_rss_gb} GB",
        )
    env = dict(os.environ)
    if a.xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + a.xla_flags).strip()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--variant",
        variant,
        "--batch-size",
        str(b),
        "--steps",
        str(a.steps),
        "--height",
        str(a.height),
        "--width",
        str(a.width),
        "--worker-out",
        out,
        "--microbatch",
        str(microbatch),
    ]
    proc = subprocess.Popen(cmd, env=env)
    ps = psutil.Process(proc.pid)
    maxrss, killed = 0.0, None
    t0 = time.time()
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss / 2**30
        except psutil.Error:
            rss = 0.0
        maxrss = max(maxrss, rss)
        if rss > a.max_rss_gb:
            killed = f"killed: RSS {rss:.1f} GB > --max-rss-gb {a.max_rss_gb}"
        elif time.time() - t0 > a.timeout:
            killed = f"killed: over --timeout {a.timeout} s"
        if killed:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.2)
    if killed or proc.returncode != 0:
        return dict(
            variant=variant,
            batch=b,
            microbatch=microbatch or b,
            failed=killed or f"exit code {proc.returncode}",
            max_rss_seen_gb=round(maxrss, 2),
        )
    with open(out) as f:
        r = json.load(f)
    os.unlink(out)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,4,16")
    p.add_argument("--variants", default="xla,base", help=f"comma-separated, of {','.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one compile + warm-up step)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--max-rss-gb", type=float, default=17.0, help="kill a child above this RSS")
    p.add_argument(
        "--est-gb-per-image", type=float, default=1.0, help="skip a batch when est x batch exceeds the available memory"
    )
    p.add_argument("--timeout", type=float, default=1200.0, help="kill a child after this many seconds")
    p.add_argument("--xla-flags", default="", help="added to XLA_FLAGS of the children")
    p.add_argument("--out", default="", help="JSON file (also printed)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--microbatch", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        r = worker(a)
        with open(a.worker_out, "w") as f:
            json.dump(r, f)
        return
    from profile_step import machine, matmul_peak

    runs = []
    for b in [int(s) for s in a.batch.split(",")]:
        for v in a.variants.split(","):
            if v not in VARIANTS:
                raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
            r = run_child(v, b, a)
            m = r.pop("machine", None)
            runs.append(r)
            print(json.dumps(r), flush=True)
    result = dict(
        machine=m if runs and m else machine(),
        matmul_peak_parent_gflops=round(matmul_peak(), 1),
        height=a.height,
        width=a.width,
        xla_flags=a.xla_flags,
        runs=runs,
    )
    emit(result, a.out)


def emit(result: dict, out: str = ""):
    """Prints ``result`` as JSON and writes it to ``out`` (if given)."""
    text = json.dumps(result, indent=1)
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
