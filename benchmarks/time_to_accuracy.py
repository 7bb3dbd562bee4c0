"""Hours to a target accuracy on N nodes (issue 13): the large-batch study's MEASURED epochs to its target at
each global batch x the per-node throughput at full resolution = hours to the target.

    python benchmarks/time_to_accuracy.py --recipe adamw --target 0.65   # the committed study, 32 images/node
    python benchmarks/time_to_accuracy.py                         # the recipe within 1 point at the largest batch
                                                                  # (else the reference's), the study's target
    python benchmarks/time_to_accuracy.py --study DIR/study.json --recipe adamw --network 100 --scheme allreduce

For each single run of ``--recipe`` in the study (``benchmarks/study_large_batch.py``; no ensemble, no lossy
exchange), global batch ``G``: ``min(G, --node-batch)`` images per node on ``G / that`` nodes. Its epochs to the
target (``--target``: the study's, the recipe's own base batch's best minus 1 point, or a number) are read from
its measured validation curve (the mean over its seeds if the study has replicas); its images/s on that many nodes
are ``bench_comm.py``'s projection (``project_row``: ``--node-image-s`` compute seconds per 1024x1280x3 training
image on one node, by default 0.092 s = bench_scaling.py's measured 3.67 s per image per core over 40 cores, plus
the ``--scheme``'s ring collectives on a ``--network`` Gb/s network; ``--overlap-json`` adds ``train.overlap`` as
bench_comm.py does). Then

    hours = epochs to target x --images (3,848: BBBC021's annotated fields) / images/s / 3600

A run whose global batch grows (the study's ``--ramp``, ``train.batch_schedule``) trains on the nodes of its last
batch throughout (``G_last / min(G_last, --node-batch)``, fewer if a phase's batch would leave a node without a
whole number of images), each phase at its own images per node; its hours are the
sum over the phases of the epochs it spent in each before reaching the target x images / that phase's images/s.

What is measured and what is assumed: the epochs to the target come from the study's synthetic screen at a reduced
field size; using them for BBBC021 at full resolution assumes the same global batch needs the same epochs there.
The node's compute is scaled from this VM's cores, the network is a model (see bench_comm.py). A run that never
reached the target has no time (``null``). JSON on stdout (and ``--out``), a Markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default=str(HERE / "results" / "study_large_batch.json"), help="a study.json")
    p.add_argument(
        "--recipe",
        default="",
        help="the study's recipe (default: the one within 1 point of the "
        "reference at the largest batch, else the reference's)",
    )
    p.add_argument(
        "--target",
        default="study",
        help='the target accuracy: "study" (the study\'s: its reference '
        "base batch's best minus 1 point), \"own\" (the recipe's own base batch's best minus 1 point) or a "
        "number (0.65); the epochs to it are read from each run's validation curve",
    )
    p.add_argument("--node-batch", type=int, default=32, help="images per node per step (default 32)")
    p.add_argument("--images", type=int, default=3848, help="training images per epoch (default: BBBC021's 3,848)")
    p.add_argument("--node-image-s", type=float, default=0.092, help="compute seconds per training image on a node")
    p.add_argument("--network", type=float, default=10.0, help="Gb/s between nodes (default 10)")
    p.add_argument("--latency-us", type=float, default=5.0)
    p.add_argument("--scheme", default="auto", help="train.comm: allreduce, factored, auto or powersgd")
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--node-gflops", type=float, default=2920.0, help="as in bench_comm.py")
    p.add_argument("--overlap-json", default="", help="a bench_overlap.py JSON: project with train.overlap")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def runs_of(study: dict) -> list[dict]:
    """The study's runs with their replicas merged (mean best accuracy, mean validation curve), as its conclusions
    use them; a study.json from before replicas has only ``runs``."""
    return study.get("groups", study["runs"])


def choose_recipe(study: dict) -> str:
    """The recipe that kept its accuracy at the largest batch (within 1 point of the reference), else the
    reference's recipe."""
    conclusions = study["conclusions"]
    reference = next(r for r in runs_of(study) if r["name"] == conclusions["reference"])
    best = reference["recipe"], reference["global_batch"]
    for recipe, c in conclusions.items():
        if isinstance(c, dict) and c.get("within_1_point"):
            largest = max(int(b) for b in c["within_1_point"])
            if largest > best[1]:
                best = recipe, largest
    return best[0]


def target_of(a, study: dict, runs: list[dict]) -> float:
    """The target accuracy that ``--target`` names (``runs``: the recipe's single runs, the base batch first)."""
    if a.target == "study":
        return study["conclusions"]["target"]
    if a.target == "own":
        return round(runs[0]["best_val_accuracy"] - 0.01, 4)
    try:
        return float(a.target)
    except ValueError:
        raise SystemExit(f"--target must be study, own or an accuracy such as 0.65; got {a.target!r}") from None


def rows_for(a, study: dict, recipe: str) -> tuple[float, list[dict]]:
    from bench_comm import abstract_params, project_row, read_overlap
    from study_large_batch import epochs_to

    from mcnn_jax.parallel import exchange

    mine = [r for r in runs_of(study) if r["recipe"] == recipe and not r["cycles"] and not r.get("comm")]
    runs = sorted((r for r in mine if not r.get("batch_schedule")), key=lambda r: r["global_batch"])
    ramps = [r for r in mine if r.get("batch_schedule")]
    if not runs:
        known = sorted({r["recipe"] for r in runs_of(study)})
        raise SystemExit(f"{a.study} has no single run of the recipe {recipe!r}; its recipes: {', '.join(known)}")
    target = target_of(a, study, runs)
    params = abstract_params(1024, 1280)
    ov = read_overlap(a.overlap_json) if a.overlap_json else None

    def project(name, g, nodes):
        if g % nodes:
            raise SystemExit(f"the global batch {g} of {name} is not a multiple of its {nodes} node(s)")
        local = g // nodes
        ns = SimpleNamespace(node_batch=local, node_image_s=a.node_image_s, latency_us=a.latency_us)
        plan = exchange.make_plan(a.scheme, params, local, nodes, a.powersgd_rank)
        return local, project_row(ns, params, plan, nodes, a.network * 1e9 / 8, a.node_gflops, ov)

    out, base_hours = [], None
    for r in runs:
        g = r["global_batch"]
        local, proj = project(r["name"], g, g // min(g, a.node_batch))
        epochs = epochs_to(r, target)
        hours = None if epochs is None else epochs * a.images / proj["images_per_s"] / 3600
        base_hours = hours if base_hours is None else base_hours
        out.append(
            dict(
                run=r["name"],
                global_batch=g,
                nodes=g // local,
                images_per_node=local,
                best_val_accuracy=r["best_val_accuracy"],
                epochs_to_target=epochs,
                images_per_s=proj["images_per_s"],
                efficiency=proj["efficiency"],
                scheme=proj["scheme"],
                hours_to_target=hours,
                speedup=(base_hours / hours) if hours and base_hours else None,
            )
        )
    for r in ramps:
        schedule, last = r["batch_schedule"], r["batch_schedule"][-1][1]
        nodes = math.gcd(last // min(last, a.node_batch), *(g for _, g in schedule))  # >= 1 image/node per phase
        epochs = epochs_to(r, target)
        phases, hours = [], 0.0
        for i, (start, g) in enumerate(schedule):
            end = schedule[i + 1][0] if i + 1 < len(schedule) else float("inf")
            local, proj = project(r["name"], g, nodes)
            spent = None if epochs is None else max(0.0, min(epochs, end) - start)
            phases.append(
                dict(
                    start_epoch=start,
                    global_batch=g,
                    images_per_node=local,
                    epochs_to_target=spent,
                    images_per_s=proj["images_per_s"],
                    efficiency=proj["efficiency"],
                )
            )
            hours = None if spent is None else hours + spent * a.images / proj["images_per_s"] / 3600
        out.append(
            dict(
                run=r["name"],
                global_batch=" -> ".join(str(g) for _, g in schedule),
                nodes=nodes,
                images_per_node=" -> ".join(str(p["images_per_node"]) for p in phases),
                best_val_accuracy=r["best_val_accuracy"],
                epochs_to_target=epochs,
                images_per_s=None if not hours else epochs * a.images / hours / 3600,
                efficiency=None,
                scheme=a.scheme,
                hours_to_target=hours,
                phases=phases,
                speedup=(base_hours / hours) if hours and base_hours else None,
            )
        )
    return target, out


def _rate(r: dict) -> str:
    if r["efficiency"] is not None:
        return f"{r['images_per_s']:.1f} ({100 * r['efficiency']:.1f}%)"
    per = ", ".join(f"{p['images_per_s']:.1f} ({100 * p['efficiency']:.1f}%)" for p in r["phases"])
    return per + (f"; {r['images_per_s']:.1f} overall" if r["images_per_s"] else "")


def markdown(rows: list[dict], target: float) -> str:
    lines = [
        f"| global batch | nodes x images | best accuracy | epochs to {100 * target:.1f}% | images/s "
        f"(efficiency) | hours to target | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        reached = r["hours_to_target"] is not None
        lines.append(
            f"| {r['global_batch']} | {r['nodes']} x {r['images_per_node']} | "
            f"{100 * r['best_val_accuracy']:.1f}% | {r['epochs_to_target'] if reached else 'not reached'} | "
            f"{_rate(r)} | "
            f"{f'{r_h:.2f}' if (r_h := r['hours_to_target']) is not None else '-'} | "
            f"{f'{s:.1f}x' if (s := r['speedup']) else '-'} |"
        )
    return "\n".join(lines)


def main(argv=None):
    from bench_train import emit

    a = parse_args(argv)
    path = Path(a.study)
    if not path.is_file():
        raise SystemExit(f"no study JSON at {path}: run benchmarks/study_large_batch.py --out DIR first")
    study = json.loads(path.read_text())
    recipe = a.recipe or choose_recipe(study)
    target, rows = rows_for(a, study, recipe)
    result = dict(
        benchmark="time_to_accuracy",
        study=str(path),
        recipe=recipe,
        target=target,
        target_rule=a.target,
        assumptions=dict(
            images_per_epoch=a.images,
            node_image_s=a.node_image_s,
            network_gbit_s=a.network,
            latency_us=a.latency_us,
            scheme=a.scheme,
            overlap=a.overlap_json or None,
            epochs="measured in the study at the same global batch (synthetic screen, reduced "
            "field size), applied to full-resolution images",
        ),
        rows=rows,
    )
    print(
        f"{recipe}, target {100 * target:.1f}% (--target {a.target}), {a.network:g} Gb/s, {a.scheme}:\n"
        + markdown(rows, target),
        file=sys.stderr,
    )
    emit(result, a.out)
    return result


if __name__ == "__main__":
    main()
