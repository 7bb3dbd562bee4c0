"""Data-parallel scaling of the M-CNN train step on this machine, and a projection to 8-128 nodes (issue 5).

    python benchmarks/bench_scaling.py                 # full resolution 1024x1280x3, global batch 2 (~7-8 min)
    python benchmarks/bench_scaling.py --quick         # smoke check: 512x640, 2 timed steps (~3 min)
    python benchmarks/bench_scaling.py --out scaling.json --node-cores 40 --net-gbytes-per-s 10

The script launches itself under ``mpiexec`` once per layout, each rank bound to its cores:

  1x2   ``mpiexec -n 1 -bind-to core:2``  one rank, 2 cores, local batch = global batch
  2x1   ``mpiexec -n 2 -bind-to core:1``  two ranks, 1 core each, local batch = global batch / 2

Each layout runs the real jitted train step (``mcnn_jax.step.make_train_step`` with
``World.allreduce_sum``, the real ``MCNN(num_classes=13)``, the published Nesterov recipe) on random
images, and times per step

  data_wait   blocking in ``queue.get()`` for the next batch from a producer thread that copies an in-memory
              numpy batch per step (no disk reading or decoding: ``benchmarks/`` has a reader benchmark)
  step        the full train step (dispatch -> results ready), with the allreduce for 2 ranks
  compute     the same step built with ``allreduce=None`` (no communication)
  allreduce   a jitted function doing only ``World.allreduce_sum`` on the flat float32 gradient buffer
              (the gradient's size + the 3 metric sums), several repetitions; also at 1, 16 and 64 MiB to fit
              ``t = alpha + bytes / beta`` (shared memory, 2 ranks)

and reports medians. ``efficiency = images/s(2x1) / images/s(1x2)`` at the same global batch. Then it projects
to 1, 8, 32 and 128 nodes (assumptions are command-line flags, printed with the table). JSON on stdout, the
human-readable summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 1 << 20
DATASET_IMAGES = 3848  # BBBC021 (the 3,848 annotated fields of the MoA subset)


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# machine state
# ---------------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_gib() -> dict:
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) / (1 << 20)
    except OSError:
        return {}
    return dict(total_gib=round(info.get("MemTotal", 0), 2), available_gib=round(info.get("MemAvailable", 0), 2))


def busy_cpu_seconds() -> float:
    """Busy CPU time of the whole machine since boot (all processes), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        v = [int(x) for x in fields]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def own_cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (mpiexec, its proxies and the ranks)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def machine_state() -> dict:
    return dict(
        loadavg=[round(x, 2) for x in os.getloadavg()], memory=mem_gib(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z")
    )


def versions() -> dict:
    out = dict(python=platform.python_version())
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "mpi4py", "mpi4jax"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - record, don't fail
            out[mod] = f"unavailable ({type(e).__name__})"
    try:
        from mpi4py import MPI

        out["mpi"] = MPI.Get_library_version().strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        out["mpi"] = f"unavailable ({type(e).__name__})"
    return out


# ---------------------------------------------------------------------------------------------------------------
# the worker: one layout, run under mpiexec
# ---------------------------------------------------------------------------------------------------------------
def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


class Producer:
    """A prefetch thread that hands out one freshly copied numpy batch per step (as the real Reader does after
    reading and augmenting); ``get()`` returns the batch and the seconds spent blocked waiting for it."""

    def __init__(self, local_batch, shape, num_classes, seed, depth=2):
        import numpy as np

        rng = np.random.default_rng(seed)
        # two source batches in memory; every step gets a copy of one of them
        self.src = [
            dict(
                image=rng.random((local_batch, *shape), dtype=np.float32),
                label=rng.integers(0, num_classes, local_batch).astype(np.int32),
            )
            for _ in range(2)
        ]
        self.q = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.copy_s = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import numpy as np

        i = 0
        while not self.stop.is_set():
            t0 = time.perf_counter()
            s = self.src[i % 2]
            batch = dict(
                image=np.array(s["image"], copy=True),
                label=np.array(s["label"], copy=True),
                mask=np.ones(s["label"].shape, np.float32),
            )
            self.copy_s.append(time.perf_counter() - t0)
            i += 1
            while not self.stop.is_set():
                try:
                    self.q.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    pass

    def get(self):
        t0 = time.perf_counter()
        batch = self.q.get()
        return batch, time.perf_counter() - t0

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)


def time_steps(variants, state, producer, world, warmup, steps):
    """Runs ``warmup`` untimed steps of every variant (the first compiles), then ``steps`` timed rounds that
    alternate the variants step by step (so that a change in the machine's load hits them alike). Returns the
    state and, per variant, per-step lists of data wait and step seconds, and the first (compiling) step's."""
    import jax

    out = {name: dict(data_wait_s=[], step_s=[], first_step_s=None) for name in variants}
    for name, fn in variants.items():
        for i in range(warmup):
            batch, _ = producer.get()
            t0 = time.perf_counter()
            state, m = fn(state, batch)
            jax.block_until_ready((state, m))
            if i == 0:
                out[name]["first_step_s"] = time.perf_counter() - t0
    names = list(variants)
    world.barrier()
    for k in range(steps):
        for name in names if k % 2 == 0 else names[::-1]:
            batch, wait = producer.get()
            t1 = time.perf_counter()
            state, m = variants[name](state, batch)
            jax.block_until_ready((state, m))
            out[name]["step_s"].append(time.perf_counter() - t1)
            out[name]["data_wait_s"].append(wait)
    world.barrier()
    return state, out


def time_allreduce(world, n_floats, reps):
    """Seconds of the jitted ``World.allreduce_sum`` of ``n_floats`` float32 (+ 3 metric sums), per rep."""
    import jax
    import jax.numpy as jnp

    fn = jax.jit(world.allreduce_sum)
    buf = jnp.ones((n_floats + 3,), jnp.float32)
    jax.block_until_ready(fn(buf))  # compile + first touch
    out = []
    for _ in range(reps):
        world.barrier()
        t0 = time.perf_counter()
        jax.block_until_ready(fn(buf))
        out.append(time.perf_counter() - t0)
    return out


def worker(args) -> None:
    import jax

    from mcnn_jax import optim
    from mcnn_jax.config import base_config, published_recipe
    from mcnn_jax.model.flops import mcnn_flops
    from mcnn_jax.model.mcnn import MCNN, count_params, init_params
    from mcnn_jax.parallel.world import fail_fast, init_world
    from mcnn_jax.step import create_state, make_train_step

    world = init_world()
    fail_fast(world)
    if args.global_batch % world.size:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world.size} ranks")
    local = args.global_batch // world.size
    shape = (args.height, args.width, 3)
    model = MCNN(num_classes=args.num_classes)
    cfg = published_recipe(base_config()).optim
    spe = optim.steps_per_epoch(DATASET_IMAGES, args.global_batch)
    schedule = optim.make_schedule(cfg, spe, args.global_batch)
    tx = optim.make_optimizer(cfg, schedule)
    params = init_params(model, jax.random.key(0), shape)
    n_params = count_params(params)
    state = world.bcast_tree(create_state(params, tx, 0))  # as train.py: rank 0's parameters everywhere
    del params
    producer = Producer(local, shape, args.num_classes, seed=1 + world.rank)
    t_start = time.perf_counter()
    res = dict(rank=world.rank, affinity=sorted(os.sched_getaffinity(0)), local_batch=local)

    # the full step, as train.py builds it (no allreduce for one rank)
    variants = dict(
        full=make_train_step(
            model,
            tx,
            args.num_classes,
            cfg.label_smoothing,
            allreduce=world.allreduce_sum if world.size > 1 else None,
            num_ranks=world.size,
            schedule=schedule,
        )
    )
    if world.size > 1:
        # compute only: the same step without the allreduce (for one rank, the full step is already that)
        variants["compute"] = make_train_step(
            model, tx, args.num_classes, cfg.label_smoothing, allreduce=None, schedule=schedule
        )
    state, timings = time_steps(variants, state, producer, world, args.warmup, args.steps)
    res.update(timings)
    del variants
    producer_copy_s = list(producer.copy_s)
    producer.close()
    del state
    res["producer_copy_s"] = median(producer_copy_s)

    if world.size > 1:
        sizes = {f"{m}MiB": m * MIB // 4 for m in args.allreduce_mib}
        sizes["gradient"] = n_params
        res["allreduce"] = {}
        for name, n in sizes.items():
            res["allreduce"][name] = dict(
                n_floats=n + 3, bytes=4 * (n + 3), s=time_allreduce(world, n, args.allreduce_reps)
            )
    res["wall_s"] = time.perf_counter() - t_start

    results = world.comm.gather(res, root=0) if world.size > 1 else [res]
    if world.is_primary:
        out = dict(
            ranks=world.size,
            local_batch=local,
            global_batch=args.global_batch,
            image_shape=list(shape),
            n_params=n_params,
            gradient_mib=4 * n_params / MIB,
            train_flops_per_image=mcnn_flops(model, args.height, args.width)["train"],
            xla_flags=os.environ.get("XLA_FLAGS", ""),
            per_rank=results,
        )
        Path(args.worker_out).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------------
def mpiexec_path() -> str:
    exe = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
    if not Path(exe).exists():
        raise SystemExit("mpiexec not found: install with launch/install.sh (the mpich wheel brings it)")
    return exe


def run_layout(args, ranks, cores_per_rank, passthrough):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "layout.json"
        threads = str(cores_per_rank)
        cmd = [mpiexec_path(), "-n", str(ranks), "-bind-to", f"core:{cores_per_rank}"]
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            cmd += ["-env", k, threads]
        cmd += [sys.executable, os.path.abspath(__file__), "--worker", "--worker-out", str(out), *passthrough]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        log(f">> layout {ranks}x{cores_per_rank}: {shlex.join(cmd)}")
        before = machine_state()
        busy0, own0, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        proc = subprocess.run(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=args.timeout
        )
        wall = time.perf_counter() - t0
        busy, own = busy_cpu_seconds() - busy0, own_cpu_seconds() - own0
        if proc.returncode != 0 or not out.exists():
            log(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"layout {ranks}x{cores_per_rank} failed (exit {proc.returncode})")
        res = json.loads(out.read_text())
    ncpu = os.cpu_count() or 1
    others = max(0.0, busy - own)
    res.update(
        layout=f"{ranks}x{cores_per_rank}",
        cores_per_rank=cores_per_rank,
        command=shlex.join(cmd),
        wall_s=round(wall, 1),
        machine_before=before,
        machine_after=machine_state(),
        other_processes_cpu_s=round(others, 1),
        other_processes_cpu_fraction=round(others / max(wall * ncpu, 1e-9), 3),
    )
    return summarise_layout(res)


def summarise_layout(res):
    """Medians per rank, then the slowest rank (a synchronous step is as slow as its slowest rank)."""
    ranks = res["per_rank"]

    def slowest(key, field):
        return max(median(r[key][field]) for r in ranks)

    g, local = res["global_batch"], res["local_batch"]
    wait, step = slowest("full", "data_wait_s"), slowest("full", "step_s")
    # end-to-end time per step (data wait + step), median over steps of the per-step max over ranks
    e2e = median(
        [
            max(r["full"]["data_wait_s"][i] + r["full"]["step_s"][i] for r in ranks)
            for i in range(len(ranks[0]["full"]["step_s"]))
        ]
    )
    s = dict(
        data_wait_s=wait,
        step_s=step,
        end_to_end_s=e2e,
        images_per_s=g / e2e,
        images_per_s_step_only=g / step,
        first_step_s=max(r["full"]["first_step_s"] for r in ranks),
        producer_copy_s=max(r["producer_copy_s"] for r in ranks),
    )
    if res["ranks"] > 1:
        compute = slowest("compute", "step_s")
        ar = {
            name: dict(
                bytes=v["bytes"],
                median_s=max(median(r["allreduce"][name]["s"]) for r in ranks),
                min_s=max(min(r["allreduce"][name]["s"]) for r in ranks),
                reps=len(v["s"]),
            )
            for name, v in ranks[0]["allreduce"].items()
        }
        for v in ar.values():
            v["gbytes_per_s"] = v["bytes"] / v["median_s"] / 1e9
        s.update(
            compute_s=compute,
            allreduce_s=ar["gradient"]["median_s"],
            compute_plus_allreduce_s=compute + ar["gradient"]["median_s"],
            unexplained_s=step - compute - ar["gradient"]["median_s"],
            allreduce_sizes=ar,
        )
    else:
        s.update(compute_s=step, allreduce_s=0.0, compute_plus_allreduce_s=step, unexplained_s=0.0)
    s["compute_s_per_image_per_rank"] = s["compute_s"] / local
    s["gflops_per_s"] = res["train_flops_per_image"] * g / s["compute_s"] / 1e9
    res["summary"] = s
    return res


def fit_alpha_beta(points):
    """Least-squares t = alpha + bytes / beta over (bytes, seconds) points; returns alpha [s], beta [B/s]."""
    n = len(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    alpha = my - slope * mx
    if alpha < 0:  # latency cannot be negative: refit through the origin
        alpha, slope = 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return alpha, (1.0 / slope if slope > 0 else float("inf"))


def full_res_params(num_classes):
    """Parameters of the M-CNN at 1024x1280x3, without allocating them."""
    import jax
    import jax.numpy as jnp

    from mcnn_jax.model.mcnn import MCNN

    model = MCNN(num_classes=num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1024, 1280, 3)))["params"])
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def project(args, layouts, fit):
    from mcnn_jax.model.flops import mcnn_flops
    from mcnn_jax.model.mcnn import MCNN

    one_core = layouts.get("2x1") or layouts.get("1x2")
    s = one_core["summary"]
    per_core_image_s = s["compute_s_per_image_per_rank"] * one_core["cores_per_rank"]
    scale = 1.0
    if (args.height, args.width) != (1024, 1280):
        model = MCNN(num_classes=args.num_classes)
        scale = mcnn_flops(model)["train"] / mcnn_flops(model, args.height, args.width)["train"]
    per_core_image_s *= scale
    node_image_s = args.node_image_s or per_core_image_s / args.node_cores
    grad_bytes = 4 * (full_res_params(args.num_classes) + 3)
    alpha_shm, beta_shm = fit
    intra_src = (
        f"measured 2-rank shared-memory fit alpha={alpha_shm * 1e6:.1f} us, beta={beta_shm / 1e9:.2f} "
        f"GB/s, at the gradient size"
    )
    if args.intra_gbytes_per_s:
        alpha_shm, beta_shm = 0.0, args.intra_gbytes_per_s * 1e9
        intra_src = f"--intra-gbytes-per-s {args.intra_gbytes_per_s:g} GB/s (instead of the measured fit)"
    t_intra = (alpha_shm + grad_bytes / beta_shm) if args.ranks_per_node > 1 else 0.0
    lat, bw = args.net_latency_us * 1e-6, args.net_gbytes_per_s * 1e9
    compute = args.node_batch * node_image_s
    rows = []
    for p in args.nodes:
        t_inter = 0.0 if p == 1 else 2 * (p - 1) * lat + 2 * (p - 1) / p * grad_bytes / bw
        comm = t_intra + t_inter
        g = args.node_batch * p
        row = dict(
            nodes=p,
            global_batch=g,
            steps_per_epoch=DATASET_IMAGES // g if g <= DATASET_IMAGES else 0,
            compute_s=compute,
            intra_node_allreduce_s=t_intra,
            inter_node_allreduce_s=t_inter,
        )
        for tag, step in (("", compute + comm), ("overlap_", max(compute, comm))):
            ips = g / step
            row[f"{tag}step_s"] = step
            row[f"{tag}images_per_s"] = ips
            row[f"{tag}hours_per_{args.epochs:g}_epochs"] = args.epochs * DATASET_IMAGES / ips / 3600
        rows.append(row)
    base = rows[0]
    for row in rows:
        for tag in ("", "overlap_"):
            row[f"{tag}efficiency"] = row[f"{tag}images_per_s"] / (
                row["nodes"] * base[f"{tag}images_per_s"] / base["nodes"]
            )
        row["efficiency_vs_no_communication"] = compute / row["step_s"]
    assumptions = dict(
        node_cores=args.node_cores,
        ranks_per_node=args.ranks_per_node,
        node_batch=args.node_batch,
        per_core_image_s=per_core_image_s,
        per_core_image_s_source=(
            f"measured compute step of layout {one_core['layout']} per image per core"
            + (f", scaled x{scale:.3f} by FLOPs from {args.height}x{args.width} to 1024x1280" if scale != 1.0 else "")
        ),
        node_image_s=node_image_s,
        node_image_s_source=(
            "--node-image-s"
            if args.node_image_s
            else "per_core_image_s / node_cores: linear scaling over the node's cores"
        ),
        gradient_bytes=grad_bytes,
        gradient_mib=grad_bytes / MIB,
        intra_node_allreduce=intra_src if args.ranks_per_node > 1 else "none (1 rank per node)",
        inter_node_allreduce=(
            f"ring: 2(p-1) x {args.net_latency_us:g} us + 2(p-1)/p x bytes / "
            f"{args.net_gbytes_per_s:g} GB/s (assumed network, e.g. 100 Gb/s InfiniBand EDR)"
        ),
        step="compute + intra-node + inter-node allreduce (no overlap: the allreduce follows the backward "
        "pass); overlap_* = max(compute, allreduce), the bound if it were fully hidden",
        data_wait="0: assumed hidden by the reader's prefetch (see the reader benchmark)",
        efficiency="images/s(p) / (p x images/s(1 node)); efficiency_vs_no_communication = compute / step",
        hours=f"{args.epochs:g} epochs x {DATASET_IMAGES} images / images/s (full passes; the trainer drops the "
        f"remainder of global_batch per epoch, see steps_per_epoch)",
    )
    return dict(assumptions=assumptions, rows=rows)


def print_report(result):
    lay = result["layouts"]
    log("")
    log(
        f"M-CNN train step at {result['image_shape'][0]}x{result['image_shape'][1]}x3, global batch "
        f"{result['global_batch']}, medians of {result['steps']} steps (seconds per step)"
    )
    log(
        f"{'layout':>7} {'data_wait':>9} {'step':>8} {'compute':>8} {'allred':>7} {'c+a':>8} {'img/s':>7} "
        f"{'GFLOP/s':>8} {'others%':>7}"
    )
    for name, r in lay.items():
        s = r["summary"]
        log(
            f"{name:>7} {s['data_wait_s']:9.4f} {s['step_s']:8.3f} {s['compute_s']:8.3f} {s['allreduce_s']:7.3f} "
            f"{s['compute_plus_allreduce_s']:8.3f} {s['images_per_s']:7.3f} {s['gflops_per_s']:8.1f} "
            f"{100 * r['other_processes_cpu_fraction']:6.1f}%"
        )
    if "efficiency" in result:
        e = result["efficiency"]
        log(
            f"scaling efficiency 2x1 vs 1x2: {100 * e['end_to_end']:.1f}% end to end "
            f"({100 * e['compute_only']:.1f}% compute only); goal >= 90%: "
            f"{'met' if e['meets_goal'] else 'NOT met'}"
        )
    if "allreduce_fit" in result:
        f = result["allreduce_fit"]
        log(
            f"allreduce (2 ranks, shared memory): t = {f['alpha_us']:.1f} us "
            f"+ bytes / {f['beta_gbytes_per_s']:.2f} GB/s"
        )
        for name, v in f["points"].items():
            log(
                f"  {name:>9}: {v['bytes'] / MIB:8.1f} MiB  {1e3 * v['median_s']:8.1f} ms  "
                f"{v['gbytes_per_s']:6.2f} GB/s"
            )
    pr = result.get("projection")
    if pr:
        a = pr["assumptions"]
        ep = [k for k in pr["rows"][0] if k.startswith("hours_per_")][0]
        log("")
        log(
            f"projection (node = {a['node_cores']} cores, {a['ranks_per_node']} ranks, batch {a['node_batch']}/node; "
            f"{a['node_image_s']:.3f} s/image/node; gradient {a['gradient_mib']:.1f} MiB)"
        )
        log(f"  intra-node: {a['intra_node_allreduce']}")
        log(f"  inter-node: {a['inter_node_allreduce']}")
        log(
            f"{'nodes':>6} {'batch':>6} {'step s':>7} {'img/s':>8} {'eff':>6} {'h/' + ep.split('_')[2] + 'ep':>8} |"
            f" {'eff/nocomm':>10} | {'overlapped: img/s':>17} {'eff':>6} {'h':>7}"
        )
        for r in pr["rows"]:
            log(
                f"{r['nodes']:6d} {r['global_batch']:6d} {r['step_s']:7.3f} {r['images_per_s']:8.1f} "
                f"{100 * r['efficiency']:5.1f}% {r[ep]:8.2f} {100 * r['efficiency_vs_no_communication']:9.1f}% | "
                f"{r['overlap_images_per_s']:17.1f} "
                f"{100 * r['overlap_efficiency']:5.1f}% {r['overlap_' + ep]:7.2f}"
            )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke check: 512x640, 2 timed steps, fewer sizes")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--num-classes", type=int, default=13)
    ap.add_argument("--global-batch", type=int, default=2, help="the same in every layout (default 2)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first compiles)")
    ap.add_argument("--layouts", default="1x2,2x1", help="RANKSxCORES_PER_RANK, comma-separated")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the layouts this many times, alternating, and keep each layout's fastest run "
        "(for a shared, noisy machine)",
    )
    ap.add_argument(
        "--allreduce-mib",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16, 64],
        help="message sizes for the bandwidth fit, besides the gradient itself",
    )
    ap.add_argument("--allreduce-reps", type=int, default=5)
    # projection
    ap.add_argument("--nodes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    ap.add_argument("--node-cores", type=int, default=40, help="cores per node (default 40: 2 sockets x 20)")
    ap.add_argument("--ranks-per-node", type=int, default=2, help="default 2: one rank per socket")
    ap.add_argument("--node-batch", type=int, default=8, help="images per node per step (default 8)")
    ap.add_argument(
        "--node-image-s",
        type=float,
        default=0.0,
        help="compute seconds per training image on a whole node (default: measured per-core time / --node-cores)",
    )
    ap.add_argument(
        "--net-gbytes-per-s",
        type=float,
        default=10.0,
        help="effective inter-node bandwidth per rank (default 10 GB/s ~ 100 Gb/s EDR InfiniBand)",
    )
    ap.add_argument("--net-latency-us", type=float, default=2.0)
    ap.add_argument(
        "--intra-gbytes-per-s",
        type=float,
        default=0.0,
        help="intra-node allreduce bandwidth (default: the 2-rank fit measured here)",
    )
    ap.add_argument("--epochs", type=float, default=100.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per layout")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.height, args.width = 512, 640
        args.steps = min(args.steps, 2)
        args.allreduce_mib = [1, 16]
        args.allreduce_reps = min(args.allreduce_reps, 3)
    if args.worker:
        return worker(args)

    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench_scaling.py", *argv])
    passthrough = [
        "--height",
        str(args.height),
        "--width",
        str(args.width),
        "--num-classes",
        str(args.num_classes),
        "--global-batch",
        str(args.global_batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--allreduce-mib",
        ",".join(map(str, args.allreduce_mib)),
        "--allreduce-reps",
        str(args.allreduce_reps),
    ]
    before = machine_state()
    ncpu = os.cpu_count() or 1
    log(f"machine: {cpu_model()}, {ncpu} CPUs, load {before['loadavg']}, memory {before['memory']}")
    if before["loadavg"][0] > 0.5:
        log(
            f"WARNING: 1-minute load {before['loadavg'][0]} before starting on {ncpu} CPUs: other processes "
            f"compete for the cores and the timings will be slower and noisier"
        )
    result = dict(
        benchmark="bench_scaling",
        command=command,
        cwd=os.getcwd(),
        machine=dict(
            cpu=cpu_model(),
            cpus=ncpu,
            affinity=sorted(os.sched_getaffinity(0)),
            platform=platform.platform(),
            **before["memory"],
        ),
        versions=versions(),
        image_shape=[args.height, args.width, 3],
        global_batch=args.global_batch,
        steps=args.steps,
        warmup=args.warmup,
        quick=args.quick,
        data_wait_note=(
            "in-memory batches: time blocked on a prefetch thread that copies a random numpy "
            "batch per step; excludes disk reading and decoding"
        ),
        load_before=before,
        layouts={},
    )
    runs = {}
    for rep in range(args.repeat):  # layouts alternate: A B A B ..., so that load changes hit both
        for lay in args.layouts.split(","):
            r, c = (int(x) for x in lay.lower().split("x"))
            runs.setdefault(f"{r}x{c}", []).append(run_layout(args, r, c, passthrough))
    for name, rs in runs.items():
        best = min(rs, key=lambda x: x["summary"]["end_to_end_s"])  # the least disturbed repeat
        best["repeats"] = [
            dict(
                end_to_end_s=x["summary"]["end_to_end_s"],
                images_per_s=x["summary"]["images_per_s"],
                other_processes_cpu_fraction=x["other_processes_cpu_fraction"],
            )
            for x in rs
        ]
        result["layouts"][name] = best
    result["load_after"] = machine_state()
    lay = result["layouts"]
    if "1x2" in lay and "2x1" in lay:
        a, b = lay["2x1"]["summary"], lay["1x2"]["summary"]
        eff = a["images_per_s"] / b["images_per_s"]
        result["efficiency"] = dict(
            definition="images/s(2 ranks x 1 core) / images/s(1 rank x 2 cores), same global batch",
            end_to_end=eff,
            step_only=a["images_per_s_step_only"] / b["images_per_s_step_only"],
            compute_only=b["compute_s"] / a["compute_s"],
            goal=0.9,
            meets_goal=eff >= 0.9,
        )
    multi = [v for v in lay.values() if v["ranks"] > 1]
    fit = None
    if multi:
        pts = multi[0]["summary"]["allreduce_sizes"]
        fit = fit_alpha_beta([(v["bytes"], v["median_s"]) for v in pts.values()])
        best = fit_alpha_beta([(v["bytes"], v["min_s"]) for v in pts.values()])
        result["allreduce_fit"] = dict(
            ranks=multi[0]["ranks"],
            transport="shared memory (one machine)",
            op="jitted World.allreduce_sum (concatenate, mpi4jax allreduce, slice, divide)",
            model="t = alpha + bytes / beta, least squares over the medians "
            "(alpha >= 0); used for the intra-node term of the projection",
            alpha_us=fit[0] * 1e6,
            beta_gbytes_per_s=fit[1] / 1e9,
            fastest_reps=dict(alpha_us=best[0] * 1e6, beta_gbytes_per_s=best[1] / 1e9),
            points=pts,
        )
    result["projection"] = project(args, lay, fit if fit else (0.0, float("inf")))
    result["warnings"] = []
    for name, v in lay.items():
        if v["other_processes_cpu_fraction"] > 0.05:
            result["warnings"].append(
                f"layout {name}: other processes used {100 * v['other_processes_cpu_fraction']:.0f}% of the "
                f"machine's CPU time during the run; timings are pessimistic"
            )
    print_report(result)
    for w in result["warnings"]:
        log("WARNING: " + w)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
