"""Bytes and time of each gradient exchange scheme (``train.comm``, issue 14), measured here on 2 ranks and
projected to 8-512 nodes on 10, 25 and 100 Gb/s networks.

    python benchmarks/bench_comm.py --out comm.json          # 1024x1280x3, local batches 1,4,8,16: ~2 min here
    python benchmarks/bench_comm.py --batches 1,16 --reps 3  # quicker

The script starts itself under ``mpiexec -n 2``. Each rank takes the parameter shapes of ``MCNN(num_classes=13)``
at the image size (``jax.eval_shape``: nothing is allocated), builds ``exchange.make_plan`` for every scheme and local
batch, and times the plan's collectives exactly as the step makes them (``World.time_comm``: a barrier, then
one jitted function with the packed allreduce(s) of ``Plan.sizes()`` and the packed allgather, waited for),
``--reps`` times after a warm-up; medians and minima over the reps, the slower rank's. Reported per scheme and
local batch: the float32 elements of each collective, the bytes each rank sends per step (ring collectives:
``2 (p-1)/p x`` the allreduce buffer, ``(p-1) x`` the allgather block) and the communication seconds. The
factored scheme also moves work: every rank computes ``X_all^T D_all`` for the global batch instead of its local
``dW``; that matmul is timed here too (one process, ``factored_matmul_s``).

The projection extends bench_scaling.py's model to each scheme: one rank per node, ``--node-batch`` 16 images,
compute ``node_batch x --node-image-s`` (0.092 s: bench_scaling's 3.67 s per image per core over 40 cores), and
per step, with bandwidth ``B`` (``--networks`` in Gb/s, /8 for bytes) and latency ``--latency-us`` per message:

    allreduce(n bytes)     2 (p-1) latency + 2 (p-1)/p n / B          (ring)
    allgather(block bytes) (p-1) latency + (p-1) block / B            (ring)
    factored matmul        2 n_in n_out (G - b) FLOP / node FLOP rate (the global batch G instead of the local b;
                           both write the same n_in x n_out gradient, so only the FLOPs differ; node rate
                           --node-gflops, by default this VM's measured matmul peak x 40 / 2 cores)

with no overlap (bench_overlap.py measures that XLA:CPU does not overlap a blocking collective). Efficiency =
compute / step (the step of one node has no communication). JSON on stdout (and ``--out``), a summary on stderr.

The ``+overlap`` rows (``train.overlap``: the head's summed dense layers travel on a background thread during the
branches' backward pass) split the plan's allreduce into the head's buffer (the summed dense layers' kernels and
every dense bias) and the rest, and hide the head's sum behind a MEASURED window, read from a
``bench_overlap.py`` JSON (``--overlap-json``): ``window = compute x stage2_fraction x hidden_fraction`` (the
branches' backward as a fraction of the step, times the share of a sleep in the background thread that the step
did not pay for), with the mechanism's own measured cost (the larger of ``overlap_mechanism``, the overlapped
step's excess over the plain one, and ``roundtrip_s``, a start -> finish of the head alone, over the plain step
at that batch: pessimistic for 16 images, as the copies do not grow with the batch; scaled by the head buffer's
size relative to the measured one) added to the compute:

    step = compute (1 + cost) + factored matmul + rest's collectives + max(0, head's allreduce - window)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASET_IMAGES = 3848  # BBBC021
SCHEMES = ("allreduce", "factored", "auto", "powersgd")
OVERLAPPED = ("allreduce", "auto")  # the exact schemes projected with train.overlap too (--overlap-json)


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def abstract_params(height: int, width: int, num_classes: int = 13):
    import jax
    import jax.numpy as jnp

    from mcnn_jax.model.mcnn import MCNN

    model = MCNN(num_classes=num_classes)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, height, width, 3))))["params"]


def plans(params, batches, ranks, rank):
    from mcnn_jax.parallel import exchange

    return {(s, b): exchange.make_plan(s, params, b, ranks, rank) for s in SCHEMES for b in batches}


def plan_row(plan) -> dict:
    return dict(
        scheme=plan.scheme,
        local_batch=plan.local_batch,
        ranks=plan.ranks,
        factored=["/".join(la.path) for la in plan.factored],
        compressed=["/".join(la.path) for la in plan.compressed],
        powersgd_rank=plan.rank,
        floats=plan.sizes(),
        bytes_sent=plan.bytes_sent(),
    )


def worker(args):
    from mcnn_jax.parallel.world import fail_fast, init_world

    world = init_world()
    fail_fast(world)
    params = abstract_params(args.height, args.width)
    rows = []
    timed = {}
    for (scheme, b), plan in plans(params, args.batches, world.size, args.powersgd_rank).items():
        sizes = plan.sizes()
        key = tuple(sorted(sizes.items()))
        if key not in timed:  # schemes whose collectives do not depend on the batch are timed once
            world.time_comm(**sizes)  # compile and warm
            timed[key] = [world.time_comm(**sizes) for _ in range(args.reps)]
        rows.append(dict(plan_row(plan), comm_s=timed[key]))
    gathered = world.comm.gather(rows, root=0)
    if world.is_primary:
        for i, row in enumerate(gathered[0]):
            per_rank = [g[i]["comm_s"] for g in gathered]
            row["comm_s"] = dict(
                median=max(statistics.median(x) for x in per_rank), min=max(min(x) for x in per_rank), reps=per_rank
            )
        Path(args.worker_out).write_text(json.dumps(gathered[0]))


def matmul_rate(fan_in: int, fan_out: int, batch: int, reps: int = 3) -> dict:
    """Seconds and GFLOP/s of ``X^T D`` ([batch, fan_in]^T [batch, fan_out]) in one process, jitted."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((batch, fan_in), jnp.float32)
    d = jnp.ones((batch, fan_out), jnp.float32)
    f = jax.jit(lambda x, d: x.T @ d)
    f(x, d).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x, d).block_until_ready()
        ts.append(time.perf_counter() - t0)
    s = min(ts)
    return dict(batch=batch, s=s, gflop_per_s=2 * fan_in * fan_out * batch / s / 1e9)


def comm_time(plan, nodes: int, bw: float, lat: float) -> float:
    """Seconds of the plan's collectives among ``nodes`` ranks (ring model, see the module docstring)."""
    s = plan.sizes()
    t = 0.0
    for n in (s["allreduce"], s["allreduce_p"]):
        if n and nodes > 1:
            t += 2 * (nodes - 1) * lat + 2 * (nodes - 1) / nodes * 4 * n / bw
    if s["allgather"] and nodes > 1:
        t += (nodes - 1) * lat + (nodes - 1) * 4 * s["allgather"] / bw
    return t


def ring_allreduce_s(floats: int, nodes: int, bw: float, lat: float) -> float:
    return 2 * (nodes - 1) * lat + 2 * (nodes - 1) / nodes * 4 * floats / bw if floats and nodes > 1 else 0.0


def overlap_split(plan, params) -> tuple[int, int]:
    """float32 elements of the overlapped head buffer (the summed dense kernels, every dense bias) and of the
    rest of the plan's allreduce."""
    from mcnn_jax.parallel import exchange

    head = sum(
        la.fan_out + (0 if la in plan.factored else la.fan_in * la.fan_out) for la in exchange.dense_layers(params)
    )
    return head, plan.sizes()["allreduce"] - head


def read_overlap(path: str) -> dict:
    """The measured overlap from a bench_overlap.py JSON: stage-2 fraction, hidden fraction, own cost."""
    r = json.loads(Path(path).read_text())
    cost = max(0.0, r["extra_s"]["overlap_mechanism"], r.get("roundtrip_s", 0.0)) / r["median_s"]["plain"]
    return dict(
        source=path,
        command=r["command"],
        stage2_fraction=r["stage2_fraction"],
        head_floats=r.get("head_floats") or head_floats_at(r["image_shape"]),
        hidden_fraction=min(1.0, max(0.0, r["hidden_fraction"]["overlap"])),
        cost_fraction=cost,
        image_shape=r["image_shape"],
        batch=r["batch"],
        loadavg=r["loadavg"],
    )


def head_floats_at(image_shape) -> int:
    from mcnn_jax.parallel import exchange

    params = abstract_params(image_shape[0], image_shape[1])
    return sum(la.fan_out * (la.fan_in + 1) for la in exchange.dense_layers(params))


def project_row(args, params, plan, p, bw, node_gflops, ov=None) -> dict:
    """One projected step of ``plan`` on ``p`` nodes (bandwidth ``bw`` B/s), overlapped as ``ov`` says (None:
    not)."""
    compute = args.node_batch * args.node_image_s
    g = args.node_batch * p
    extra = sum(2 * la.fan_in * la.fan_out * (g - args.node_batch) for la in plan.factored) / (node_gflops * 1e9)
    lat = args.latency_us * 1e-6
    t_comm = comm_time(plan, p, bw, lat)
    step = compute + extra + t_comm
    row = dict(scheme=plan.scheme, factored=["/".join(la.path) for la in plan.factored])
    if ov is not None:
        head, rest = overlap_split(plan, params)
        t_head = ring_allreduce_s(head, p, bw, lat)
        t_rest = t_comm - ring_allreduce_s(plan.sizes()["allreduce"], p, bw, lat) + ring_allreduce_s(rest, p, bw, lat)
        window = compute * ov["stage2_fraction"] * ov["hidden_fraction"]
        exposed = max(0.0, t_head - window)
        t_comm = t_rest + t_head
        cost = ov["cost_fraction"] * min(1.0, head / ov["head_floats"])  # the copies follow the head's size
        step = compute * (1 + cost) + extra + t_rest + exposed
        row.update(
            scheme=plan.scheme + "+overlap", head_allreduce_s=t_head, hidden_window_s=window, exposed_head_s=exposed
        )
    ips = g / step
    row.update(
        global_batch=g,
        bytes_sent_per_rank=plan.bytes_sent()["total"],
        compute_s=compute,
        factored_matmul_s=extra,
        comm_s=t_comm,
        step_s=step,
        images_per_s=ips,
        efficiency=compute / step,
        hours_per_100_epochs=100 * DATASET_IMAGES / ips / 3600,
    )
    return row


def project(args, params, node_gflops: float, ov=None) -> list[dict]:
    from mcnn_jax.parallel import exchange

    rows = []
    for gbits in args.networks:
        bw = gbits * 1e9 / 8
        for p in args.nodes:
            for scheme in SCHEMES:
                plan = exchange.make_plan(scheme, params, args.node_batch, p, args.powersgd_rank)
                row = project_row(args, params, plan, p, bw, node_gflops)
                rows.append(dict(network_gbit_s=gbits, nodes=p, **row))
            for scheme in OVERLAPPED if ov else ():
                plan = exchange.make_plan(scheme, params, args.node_batch, p, args.powersgd_rank)
                row = project_row(args, params, plan, p, bw, node_gflops, ov)
                rows.append(dict(network_gbit_s=gbits, nodes=p, **row))
    return rows


def mpiexec_path() -> str:
    exe = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
    if not Path(exe).exists():
        raise SystemExit("mpiexec not found: install with launch/install.sh (the mpich wheel brings it)")
    return exe


def run_workers(args) -> tuple[list, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [
            mpiexec_path(),
            "-n",
            "2",
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--worker-out",
            str(out),
            "--height",
            str(args.height),
            "--width",
            str(args.width),
            "--batches",
            ",".join(map(str, args.batches)),
            "--reps",
            str(args.reps),
            "--powersgd-rank",
            str(args.powersgd_rank),
        ]
        log(f">> {shlex.join(cmd)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        if proc.returncode or not out.exists():
            log(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"the 2-rank run failed (exit {proc.returncode})")
        return json.loads(out.read_text()), shlex.join(cmd)


def print_report(result):
    log(f"\nmeasured, 2 ranks (shared memory), {result['image_shape']}: MiB sent per rank per step / comm ms (median)")
    log(f"{'local batch':>11} " + " ".join(f"{s:>20}" for s in SCHEMES))
    for b in result["batches"]:
        cells = []
        for s in SCHEMES:
            r = next(x for x in result["measured"] if x["scheme"] == s and x["local_batch"] == b)
            cells.append(f"{r['bytes_sent']['total'] / 2**20:9.2f} {1e3 * r['comm_s']['median']:9.1f}ms")
        log(f"{b:>11} " + " ".join(f"{c:>20}" for c in cells))


def print_projection(result):
    log(
        f"\nprojection ({result['projection_assumptions']['node_batch']} images per node): efficiency / "
        f"images/s / hours per 100 epochs"
    )
    for gbits in result["projection_assumptions"]["networks_gbit_s"]:
        log(f"  {gbits:g} Gb/s")
        for p in result["projection_assumptions"]["nodes"]:
            rs = [r for r in result["projection"] if r["network_gbit_s"] == gbits and r["nodes"] == p]
            log(
                f"  {p:>5} nodes "
                + " ".join(
                    f"{r['scheme']:>9} {100 * r['efficiency']:5.1f}% "
                    f"{r['images_per_s']:7.0f} {r['hours_per_100_epochs']:6.3f}"
                    for r in rs
                )
            )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--powersgd-rank", type=int, default=4)
    ap.add_argument("--nodes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 128, 512])
    ap.add_argument(
        "--networks",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[10.0, 25.0, 100.0],
        help="Gb/s per node (default 10,25,100)",
    )
    ap.add_argument("--latency-us", type=float, default=5.0, help="per message (default 5 us)")
    ap.add_argument("--node-batch", type=int, default=16)
    ap.add_argument(
        "--node-image-s",
        type=float,
        default=0.092,
        help="compute seconds per training image on a node (default 0.092: bench_scaling.py's 3.67 s "
        "per image per core / 40 cores)",
    )
    ap.add_argument("--node-cores", type=int, default=40)
    ap.add_argument(
        "--node-gflops",
        type=float,
        default=2920.0,
        help="a node's matmul rate for the factored X^T D (default 2920: the 146 GFLOP/s fp32 matmul "
        "peak bench_train.py measured on this 2-core VM x 40 / 2); 0: measure X^T D here and scale",
    )
    ap.add_argument(
        "--overlap-json",
        default="",
        help="a bench_overlap.py JSON: adds the +overlap rows with its measured window and cost",
    )
    ap.add_argument("--skip-measure", action="store_true", help="only the projection")
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    import jax

    params = abstract_params(args.height, args.width)
    hidden = max((x for x in jax.tree_util.tree_leaves(params) if x.ndim == 2), key=lambda x: x.size)
    mm = matmul_rate(*hidden.shape, batch=256)  # large enough to be compute-bound
    node_gflops = args.node_gflops or mm["gflop_per_s"] * args.node_cores / (os.cpu_count() or 1)
    result = dict(
        benchmark="bench_comm",
        command=shlex.join(["bench_comm.py", *(argv or sys.argv[1:])]),
        image_shape=[args.height, args.width, 3],
        batches=args.batches,
        reps=args.reps,
        loadavg_before=os.getloadavg(),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        factored_matmul=[matmul_rate(*hidden.shape, batch=b) for b in (2 * x for x in args.batches)],
    )
    if not args.skip_measure:
        result["measured"], result["mpiexec"] = run_workers(args)
        result["loadavg_after"] = os.getloadavg()
    full = abstract_params(1024, 1280)
    ov = read_overlap(args.overlap_json) if args.overlap_json else None
    result["projection_assumptions"] = dict(
        nodes=args.nodes,
        networks_gbit_s=args.networks,
        latency_us=args.latency_us,
        node_batch=args.node_batch,
        node_image_s=args.node_image_s,
        ranks_per_node=1,
        node_matmul_gflop_per_s=node_gflops,
        node_matmul_source=(
            "--node-gflops"
            if args.node_gflops
            else f"X^T D at batch 256 measured here x {args.node_cores} / {os.cpu_count()}"
        ),
        matmul_here=dict(mm, note="X^T D at batch 256 on this machine now (load: loadavg_before)"),
        overlap=(
            "none in the plain rows (bench_overlap.py: XLA:CPU runs a blocking collective apart from the "
            "backward pass); +overlap rows: see overlap_measured"
        ),
        overlap_measured=ov,
        model="1024x1280x3, 13 classes",
    )
    result["projection"] = project(args, full, node_gflops, ov)
    if not args.skip_measure:
        print_report(result)
    print_projection(result)
    from bench_train import emit

    emit(result, args.out)


if __name__ == "__main__":
    main()
