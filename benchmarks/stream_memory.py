"""Peak memory of one training step with exact streaming off and on, against ``mcnn_jax.memory.estimate``.

For every (field size, variant) a fresh subprocess builds the published M-CNN (13 classes) with the variant's
``model`` keys, its optimizer state (the published Nesterov recipe) and the real jitted train step at local batch
1, runs ``--steps`` steps on a random field, and reports its peak resident memory (``VmHWM``:
``profile_step.peak_rss_bytes``), its resident memory before the model existed (the process baseline) and its step
times. The parent first asks ``mcnn_jax.memory.estimate`` (compiling, not running) what the step will take: a
variant whose estimate exceeds the memory available is reported as skipped, with the estimate, instead of being
run. The step time of each variant is also given as a ratio to the unstreamed step's at the same size (when that
one ran).

    python benchmarks/stream_memory.py                                 # 1024x1280 .. 8192x10240 (~15 min)
    python benchmarks/stream_memory.py --sizes 1024x1280,2048x2560 --variants off,tile512 --out m.json

Variants: off (no streaming), tile256 / tile512 (the first 3 branches streamed in tiles of 256 / 512 pixels),
all512 (every branch streamed, tiles of 512); every variant uses ``model.head="global_max"`` (the published
"flatten" head grows with the field: 2.7 billion parameters at 8192x10240), and ``flatten`` is the published
model unstreamed, for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "flatten": dict(),
    "off": dict(head="global_max"),
    "tile256": dict(head="global_max", stream_tile=256, stream_branches=3),
    "tile512": dict(head="global_max", stream_tile=512, stream_branches=3),
    "all512": dict(head="global_max", stream_tile=512, stream_branches=-1),
}


def config_for(variant: str, height: int, width: int):
    from mcnn_jax.config import base_config

    c = base_config()
    c.model.input_shape = (height, width, 3)
    c.model.num_classes = 13
    for k, v in VARIANTS[variant].items():
        setattr(c.model, k, v)
    c.train.global_batch = 1
    c.train.microbatch = 0
    return c


def worker(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from profile_step import peak_rss_bytes

    from mcnn_jax import optim
    from mcnn_jax.model.mcnn import from_config, init_params
    from mcnn_jax.step import create_state, make_train_step

    jax.block_until_ready(jnp.ones(8) + 1)  # the runtime up, nothing of the model yet
    baseline = peak_rss_bytes()
    c = config_for(a.variant, a.height, a.width)
    model = from_config(c.model, num_classes=13)
    tx = optim.make_optimizer(c.optim, optax.constant_schedule(1e-3))
    state = create_state(init_params(model, jax.random.key(0), (a.height, a.width, 3)), tx, 0)
    step = make_train_step(model, tx, 13)
    # an 8-bit field (a quarter of the float32 batch on the host), made float32 on the device: the batch itself is the
    # only full-size float32 copy, as in the estimate
    image = np.random.default_rng(1).integers(0, 256, (1, a.height, a.width, 3), dtype=np.uint8)
    batch = dict(image=jnp.asarray(image).astype(jnp.float32) / 255.0, label=jnp.zeros(1, jnp.int32))
    del image
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return dict(
        peak_rss_bytes=peak_rss_bytes(),
        baseline_bytes=baseline,
        step_s=[round(t, 2) for t in times],
        loss_finite=bool(jnp.isfinite(m["loss_sum"])),
    )


def run(variant: str, height: int, width: int, a) -> dict:
    import psutil

    from mcnn_jax.memory import estimate

    row = dict(variant=variant, size=f"{height}x{width}", model=VARIANTS[variant])
    t = time.perf_counter()
    est = estimate(config_for(variant, height, width), num_classes=13)
    p = est["bytes"]
    # what the worker holds: the baseline and the train step (its batch included), no data pipeline or evaluation
    row.update(
        estimate_step_gb=round((p["baseline"] + p["train_step"]) / 1e9, 3), estimate_s=round(time.perf_counter() - t, 1)
    )
    row["estimate"] = {k: round(v / 1e9, 3) for k, v in p.items()}
    avail = psutil.virtual_memory().available
    if p["baseline"] + p["train_step"] > 0.9 * avail:
        row["skipped"] = f"estimated {row['estimate_step_gb']} GB > 90% of the {avail / 1e9:.1f} GB available"
        return row
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--height", str(height)]
    cmd += ["--width", str(width), "--steps", str(a.steps), "--worker-out", out]
    proc = subprocess.run(cmd)
    if proc.returncode:
        row["failed"] = f"exit code {proc.returncode}"
        return row
    with open(out) as f:
        r = json.load(f)
    os.unlink(out)
    row.update(
        peak_rss_gb=round(r["peak_rss_bytes"] / 1e9, 3),
        baseline_gb=round(r["baseline_bytes"] / 1e9, 3),
        measured_over_estimate=round(r["peak_rss_bytes"] / (p["baseline"] + p["train_step"]), 3),
        step_s=r["step_s"],
        loss_finite=r["loss_finite"],
    )
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024x1280,2048x2560,4096x5120,8192x10240")
    p.add_argument("--variants", default="flatten,off,tile256,tile512,all512")
    p.add_argument(
        "--steps", type=int, default=3, help="steps per run (the first one compiles; the best other is timed)"
    )
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="off", help=argparse.SUPPRESS)
    p.add_argument("--height", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=1280, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        with open(a.worker_out, "w") as f:
            json.dump(worker(a), f)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import emit
    from profile_step import machine

    rows = []
    for size in a.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        for variant in a.variants.split(","):
            if variant == "flatten" and h * w > 2048 * 2560:
                continue  # the published head alone: 2.7 billion parameters (10.7 GB) at 8192x10240
            rows.append(run(variant, h, w, a))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            base = next((r for r in rows if r["size"] == size and r["variant"] == "off" and "step_s" in r), None)
            if base and "step_s" in rows[-1] and len(base["step_s"]) > 1 and len(rows[-1]["step_s"]) > 1:
                # the best step after the first (which compiles) of each
                rows[-1]["step_time_vs_off"] = round(min(rows[-1]["step_s"][1:]) / min(base["step_s"][1:]), 3)
    emit(dict(benchmark="stream_memory", machine=machine(), steps=a.steps, rows=rows), a.out)


if __name__ == "__main__":
    main()
