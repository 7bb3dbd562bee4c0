"""The large-batch study (issue 13): does a 16x larger global batch reach the base batch's accuracy in the same
number of epochs? One command, JSON + PNG out.

On a harder synthetic screen (``data.synthetic.difficulty``; weaker, image-to-image varying phenotypes and more
noise) at a reduced field size, with the published M-CNN branch structure (seven branches, pool factors 1..64)
at thin widths, every recipe trains at global batches ``base x multiplier`` for the same number of epochs:

- ``nesterov``: Nesterov momentum 0.9, the linear scaling rule (``lr = base_lr x batch / base``), a 5-epoch
  linear warmup, linear decay (the published recipe, with this study's ``base_lr``);
- ``lars``: LARS (masks as in ``mcnn_jax.optim``; trust coefficient ``--lars-trust``), the same warmup, linear
  scaling, polynomial decay (power 2);
- ``adamw``: AdamW, the same warmup, linear scaling (``--scaling``; ``sqrt`` is the other usual rule), cosine
  decay;
- ``lamb`` (not run by default): LAMB, the same warmup, square-root scaling, polynomial decay (power 2).

Every run warms up from a tenth of its (scaled) peak learning rate and decays to a hundredth of it.

Multipliers may differ per recipe (``--multipliers``). ``--powersgd RECIPE:BATCH`` reruns a run with
``train.comm="powersgd"`` (one process: the same arithmetic as N ranks, the compression being linear in the
summed gradient) to measure the lossy exchange's accuracy cost.

``--ramp RECIPE:EPOCH=BATCH,...`` adds a run whose global batch grows (``train.batch_schedule``; default
``adamw:0=16,10=64,20=256``: 10 epochs at the base batch, 10 at 4x, the last 20 at 16x, following the gradient noise
scale measured along the study's runs); it is named ``<recipe>_b<last batch>_ramp`` and compared with the base
batch as the 16x runs are.

Then the collapsed ensemble (``optim.cycles``): at the batches of ``--ensemble-batches``, the ``--ensemble-recipe``
trains ``epochs - cycles x cycle_epochs`` main epochs plus the cycles (the same total epochs as the single model)
and its snapshots are evaluated as an ensemble (mean probabilities).

``--replicas 1,2`` trains the runs of ``--replicate`` (default: all) again with those initialisation seeds (the same
store, split and schedule; ``<name>_seed<N>``); the conclusions then compare means over the seeds, and
``groups`` in study.json has each run's mean, standard deviation and per-seed best accuracy and mean curve.

Reported per run (``<out>/study.json``; ``<out>/study.md`` is its table): final and best validation accuracy (per
image; per treatment, i.e. the
mean probabilities of each (compound, concentration)'s validation images, at the end), the epochs to the target
accuracy, throughput, and the curves; ``<out>/study.png`` has the training and validation loss of all runs.
Each run trains in ``<out>/runs/<name>`` (a finished run is reused when the study is rerun).

    python benchmarks/study_large_batch.py --out study    # the study (10 runs, ~55 min here; see benchmarks/README)
    python benchmarks/study_large_batch.py --out study --only lars_b256   # one run of it (e.g. one per process);
                                                          # the first command then reuses it and writes the report
    python benchmarks/study_large_batch.py --out study --replicas 1,2,3,4 \\
        --replicate nesterov_b16,adamw_b16,adamw_b64,adamw_b256,adamw_b256_powersgd4,adamw_b256_ramp   # as reported
        (means)
    python benchmarks/study_large_batch.py --out study2 --store study/data/store --seed 3 \\
        --set optim.b2=0.984 --only adamw_b256             # one run with a config key changed (its own --out)
    python benchmarks/study_large_batch.py --out /tmp/s --images 48 --classes 4 --epochs 2 --multipliers 1,2 \\
        --base-batch 4 --recipes nesterov,lars --ensemble-recipe nesterov --ensemble-batches 8 --cycles 1 \\
        --cycle-epochs 0.5 --powersgd "" --ramp ""        # tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = {
    "nesterov": dict(name="nesterov", momentum=0.9, decay="linear"),
    "lars": dict(name="lars", momentum=0.9, nesterov=False, decay="polynomial", power=2.0),
    "adamw": dict(name="adamw", decay="cosine"),
    "lamb": dict(name="lamb", decay="polynomial", power=2.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for study.json, study.png, runs/ and data/")
    p.add_argument("--store", default="", help="an existing store (default: generate the hard screen in --out)")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="field height and width (a multiple of 64 x --merge-pool)")
    p.add_argument("--merge-pool", type=int, default=1, help="model.merge_pool (1 lets 64x64 fields through)")
    p.add_argument("--difficulty", type=float, default=0.15)
    p.add_argument("--widths", default="2,2,2,4,4,4,4", help="the seven branches' widths")
    p.add_argument("--epochs", type=float, default=40.0)
    p.add_argument("--base-batch", type=int, default=16)
    p.add_argument(
        "--multipliers",
        default="nesterov=1,16;lars=1,16;adamw=1,4,16",
        help="batch multipliers of the base batch for every recipe "
        '("1,4,16"), or per recipe ("nesterov=1,4,16;lars=1,16"); 1 is always run first',
    )
    p.add_argument("--recipes", default="nesterov,lars,adamw")
    p.add_argument(
        "--lr",
        default="nesterov=0.01,lars=0.00625,adamw=0.002,lamb=0.0025",
        help="base learning rate at the base batch per recipe (scaled with the batch by --scaling)",
    )
    p.add_argument(
        "--scaling",
        default="nesterov=linear,lars=linear,adamw=linear,lamb=sqrt",
        help="optim.lr_scaling per recipe: linear, sqrt or none",
    )
    p.add_argument(
        "--grad-clip",
        default="",
        help="optim.grad_clip (global-norm clipping before the optimizer) per "
        'recipe, e.g. "nesterov=1.0"; 0 or absent: none',
    )
    p.add_argument("--lars-trust", type=float, default=0.01, help="LARS's trust coefficient (optim.trust_coefficient)")
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument(
        "--target",
        type=float,
        default=0.0,
        help="target validation accuracy (0: the base batch's best accuracy with the first recipe minus 0.01)",
    )
    p.add_argument("--ensemble-recipe", default="adamw")
    p.add_argument(
        "--ensemble-batches", default="", help="global batches with a collapsed-ensemble run (default: the largest)"
    )
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--cycle-epochs", type=float, default=4.0)
    p.add_argument(
        "--powersgd",
        default="adamw:256",
        help="RECIPE:BATCH,... runs again with train.comm='powersgd' (the "
        "lossy low-rank exchange, whose accuracy cost is the gap to the same run without it)",
    )
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument(
        "--ramp",
        default="adamw:0=16,10=64,20=256",
        help="RECIPE:EPOCH=BATCH,... a run whose global "
        'batch grows (train.batch_schedule: from each start epoch on, that batch); "" for none',
    )
    p.add_argument(
        "--only",
        default="",
        help="train only these runs of the study (names as in <out>/runs, comma-"
        "separated; e.g. one per process) and stop without the report",
    )
    p.add_argument("--seed", type=int, default=0, help="the generated store's seed and the runs' initialisation seed")
    p.add_argument(
        "--replicas",
        default="",
        help='further initialisation seeds ("1,2"): the runs of --replicate '
        "train again with each (same store, split and schedule; run folders <name>_seed<N>) and every "
        "accuracy in the conclusions is the mean over the seeds",
    )
    p.add_argument(
        "--replicate", default="", help="the runs to replicate (names as in <out>/runs, comma-separated; default: all)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run (repeatable; e.g. optim.b2=0.984). Run names do not "
        "show it: give such a study its own --out (--store can share the data)",
    )
    return p.parse_args(argv)


def multipliers(spec: str, recipe: str) -> list[int]:
    """The batch multipliers of ``recipe`` from ``--multipliers`` ("1,4,16" or "nesterov=1,4,16;lars=1,16")."""
    if "=" not in spec:
        return [int(m) for m in spec.split(",")]
    per = dict(item.split("=", 1) for item in spec.split(";"))
    if recipe not in per:
        raise SystemExit(f"--multipliers {spec!r} gives no multipliers for the recipe {recipe!r}")
    return [int(m) for m in per[recipe].split(",")]


def per_recipe(spec: str, recipe: str, default):
    """``recipe``'s value in a per-recipe option ("nesterov=0.03,lars=0.015"), else ``default``."""
    return dict(item.split("=", 1) for item in spec.split(",") if item).get(recipe, default)


def ramp_schedule(spec: str) -> tuple[str, tuple]:
    """``--ramp`` (``adamw:0=16,10=64,20=256``) as (recipe, ``train.batch_schedule``); ("", ()) for none."""
    if not spec:
        return "", ()
    try:
        recipe, phases = spec.split(":")
        pairs = tuple((int(e), int(b)) for e, b in (x.split("=") for x in phases.split(",")))
    except ValueError:
        raise SystemExit(f"--ramp {spec!r}: expected RECIPE:EPOCH=BATCH,... such as adamw:0=16,10=64,20=256") from None
    return recipe, pairs


def make_config(
    a, store: str, recipe: str, batch: int, cycles: int = 0, comm: str = "", seed: int | None = None, ramp: bool = False
):
    """The config of one run (``cycles`` > 0: the collapsed ensemble, within the same total epochs; ``comm``:
    ``train.comm``, "" for the default; ``seed``: the initialisation seed, default ``--seed``; ``ramp``: the
    growing batch of ``--ramp``, ending at ``batch``)."""
    from mcnn_jax.config import apply_overrides, base_config
    from mcnn_jax.optim import scaled_lr

    c = base_config()
    c.seed = a.seed if seed is None else seed
    c.data.store = store
    c.data.augment.rot90 = True
    c.model.input_shape = (a.size, a.size, 3)
    c.model.merge_pool = a.merge_pool
    c.model.widths = tuple(int(w) for w in a.widths.split(","))
    c.model.merge_width, c.model.head_width = 32, 32
    lr = per_recipe(a.lr, recipe, None)
    if lr is None:
        raise SystemExit(f"--lr {a.lr!r} gives no learning rate for the recipe {recipe!r}")
    lr = float(lr)
    c.optim.update(RECIPES[recipe])
    c.optim.trust_coefficient = a.lars_trust
    c.optim.grad_clip = float(per_recipe(a.grad_clip, recipe, 0.0))
    c.optim.lr_scaling = per_recipe(a.scaling, recipe, "linear")
    # the warmup starts at a tenth of the (scaled) peak and the decay ends at a hundredth of it, at every batch
    peak = scaled_lr(lr, batch, a.base_batch, c.optim.lr_scaling)
    c.optim.update(
        base_lr=lr,
        base_batch=a.base_batch,
        warmup_epochs=a.warmup_epochs,
        warmup_init_lr=peak / 10,
        end_lr=peak / 100,
        epochs=a.epochs - cycles * a.cycle_epochs,
        cycles=cycles,
        cycle_epochs=a.cycle_epochs,
        cycle_base_lr=lr / 2,
    )
    c.train.update(
        global_batch=batch,
        max_steps=0,
        eval_every_epochs=1.0,
        log_every_steps=1,
        progress="log",
        keep_checkpoints=1,
        eval_batch=64,
    )
    if comm:
        c.train.update(comm=comm, powersgd_rank=a.powersgd_rank)
    if ramp:
        c.train.batch_schedule = ramp_schedule(a.ramp)[1]
    return apply_overrides(c, a.set)


def evaluate_run(workdir: Path, store, val_idx, which: str) -> dict:
    """Image- and treatment-level accuracy of checkpoint(s) ``which`` on the validation images."""
    from mcnn_jax.evaluation.embed import predict_probabilities
    from mcnn_jax.evaluation.run import load_ensemble

    model, members, _ = load_ensemble(workdir, which)
    probs = predict_probabilities(model, members, store, val_idx, 64)
    labels = np.asarray(store.labels)[val_idx]
    compound = np.asarray(store.metadata["compound"])[val_idx]
    conc = np.asarray(store.metadata["concentration"], dtype=str)[val_idx]
    treatments = sorted(set(zip(compound, conc)))
    hits = [
        probs[(compound == t) & (conc == c)].mean(0).argmax() == labels[(compound == t) & (conc == c)][0]
        for t, c in treatments
    ]
    return dict(
        members=len(members),
        image_accuracy=float((probs.argmax(1) == labels).mean()),
        treatment_accuracy=float(np.mean(hits)),
        treatments=len(treatments),
        loss=float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean()),
    )


def curves(workdir: Path) -> dict:
    """Per-epoch mean training loss, validation loss and accuracy from metrics.jsonl."""
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    by_epoch: dict[int, list] = {}
    for r in train:
        by_epoch.setdefault(int(np.ceil(r["epoch"] - 1e-9)), []).append(r["loss"])
    val = [r for r in records if r["split"] == "val"]
    return dict(
        train_epoch=sorted(by_epoch),
        train_loss=[float(np.mean(by_epoch[e])) for e in sorted(by_epoch)],
        val_epoch=[r["epoch"] for r in val],
        val_loss=[r["loss"] for r in val],
        val_accuracy=[r["accuracy"] for r in val],
    )


def run_name(
    a, recipe: str, batch: int, cycles: int = 0, comm: str = "", ramp: bool = False, seed: int | None = None
) -> str:
    """The run's folder name under ``<out>/runs``, e.g. ``adamw_b256_ensemble2``; a replica (``seed`` other than
    ``--seed``) adds ``_seed<N>``."""
    return (
        f"{recipe}_b{batch}"
        + (f"_ensemble{cycles}" if cycles else "")
        + (f"_{comm}{a.powersgd_rank}" if comm else "")
        + ("_ramp" if ramp else "")
        + (f"_seed{seed}" if seed not in (None, a.seed) else "")
    )


def run_one(
    a,
    out: Path,
    store,
    val_idx,
    recipe: str,
    batch: int,
    cycles: int = 0,
    comm: str = "",
    ramp: bool = False,
    seed: int | None = None,
) -> dict:
    from mcnn_jax.optim import scaled_lr
    from mcnn_jax.train import train_and_evaluate

    name = run_name(a, recipe, batch, cycles, comm, ramp, seed)
    workdir = out / "runs" / name
    config = make_config(a, str(store.path), recipe, batch, cycles, comm, seed, ramp)
    done = workdir / "summary.json"
    summary = json.loads(done.read_text()) if done.is_file() else {"preempted_at_step": None}
    if "preempted_at_step" in summary:  # not started, or stopped by a signal: train (or resume)
        summary = train_and_evaluate(config, workdir)
        if "preempted_at_step" in summary:
            raise SystemExit(
                f"the run {name} was stopped at step {summary['preempted_at_step']}; rerun the same "
                f"command to resume the study"
            )
    row = dict(
        name=name,
        group=run_name(a, recipe, batch, cycles, comm, ramp),
        seed=config.seed,
        recipe=recipe,
        global_batch=batch,
        multiplier=batch / a.base_batch,
        cycles=cycles,
        comm=comm,
        epochs=a.epochs,
        batch_schedule=[list(p) for p in config.train.batch_schedule] or None,
        lr_scaling=config.optim.lr_scaling,
        peak_lr=scaled_lr(config.optim.base_lr, batch, a.base_batch, config.optim.lr_scaling),
        steps=summary["final_step"],
        wall_s=summary["wall_s"],
        images_per_s=summary["images_per_s"],
        **curves(workdir),
    )
    row["final"] = evaluate_run(workdir, store, val_idx, "latest")
    row["best_val_accuracy"] = max(row["val_accuracy"])
    if cycles:
        row["ensemble"] = evaluate_run(workdir, store, val_idx, "snapshots")
    return row


def epochs_to(row: dict, target: float):
    return next((e for e, acc in zip(row["val_epoch"], row["val_accuracy"]) if acc >= target), None)


def merge_seeds(rows: list[dict]) -> list[dict]:
    """One row per run of the study (``group``), its replicas' seeds merged: the mean and standard deviation of
    the best validation accuracy, each seed's, and the mean validation curve (on which the epochs to the target are
    read). A run without replicas is its own group of one."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("group", r["name"]), []).append(r)
    merged = []
    for name, members in groups.items():
        first, best = members[0], [m["best_val_accuracy"] for m in members]
        epochs = first["val_epoch"]
        if any(m["val_epoch"] != epochs for m in members):
            raise SystemExit(
                f"the replicas of {name} were evaluated at different epochs: {', '.join(m['name'] for m in members)}"
            )
        merged.append(
            dict(
                {k: first[k] for k in ("recipe", "global_batch", "multiplier", "cycles", "comm", "peak_lr", "steps")},
                batch_schedule=first.get("batch_schedule"),
                name=name,
                seeds=[m.get("seed") for m in members],
                best_val_accuracy=float(np.mean(best)),
                best_val_accuracy_sd=float(np.std(best, ddof=1)) if len(best) > 1 else None,
                best_val_accuracy_per_seed=best,
                val_epoch=epochs,
                val_accuracy=[float(v) for v in np.mean([m["val_accuracy"] for m in members], axis=0)],
                final_image_accuracy=float(np.mean([m["final"]["image_accuracy"] for m in members])),
                final_treatment_accuracy=float(np.mean([m["final"]["treatment_accuracy"] for m in members])),
                **(
                    {
                        "ensemble_image_accuracy": float(np.mean([m["ensemble"]["image_accuracy"] for m in members])),
                        "ensemble_treatment_accuracy": float(
                            np.mean([m["ensemble"]["treatment_accuracy"] for m in members])
                        ),
                    }
                    if "ensemble" in first
                    else {}
                ),
            )
        )
    return merged


def markdown(result: dict) -> str:
    """The study's table (one row per run, replicas merged): what ``<out>/study.md`` holds."""
    c = result["conclusions"]
    lines = [
        "| run | global batch | peak lr | updates | seeds | best val acc (image): mean, sd, range | final "
        "(image) | final (treatment) | gap to own base | gap to best base |",
        "| --- " * 10 + "|",
    ]

    def pct(x):
        return f"{100 * x:.1f}%"

    recipes = list(dict.fromkeys(g["recipe"] for g in result["groups"]))
    for g in sorted(
        result["groups"],
        key=lambda g: (
            recipes.index(g["recipe"]),
            g["cycles"],
            bool(g["comm"]),
            bool(g.get("batch_schedule")),
            g["global_batch"],
        ),
    ):
        per = g["best_val_accuracy_per_seed"]
        best = pct(g["best_val_accuracy"]) + (
            f", {100 * g['best_val_accuracy_sd']:.1f}, {pct(min(per))}-{pct(max(per))}" if len(per) > 1 else ""
        )
        mine = c.get(g["recipe"], {}) if not g["cycles"] and not g["comm"] else {}
        own, ref = (
            mine.get("gap_to_own_base", {}).get(g["global_batch"]),
            mine.get("gap_to_reference", {}).get(g["global_batch"]),
        )
        if g["comm"]:
            own = c.get("powersgd_cost", {}).get(g["name"])
        if g.get("batch_schedule"):
            own, ref = (c.get("ramp", {}).get(g["name"], {}).get(k) for k in ("gap_to_own_base", "gap_to_reference"))
        if g["global_batch"] == result["args"]["base_batch"] and not g["comm"]:
            own = None  # a base batch is its own base
        gaps = [
            "" if x is None or g["name"] == c["reference"] else f"{100 * x + 0.0:.1f}".replace("-0.0", "0.0")
            for x in (own, ref)
        ]
        if g["comm"] and gaps[0]:
            gaps[0] += " (to the same run and seed without it)"
        batch = (
            " -> ".join(f"{b} (epoch {e})" for e, b in g["batch_schedule"])
            if g.get("batch_schedule")
            else g["global_batch"]
        )
        lines.append(
            f"| {g['name']} | {batch} | {g['peak_lr']:g} | {g['steps']:,} | {len(per)} | {best} | "
            f"{pct(g['final_image_accuracy'])} | {pct(g['final_treatment_accuracy'])} | {gaps[0]} | "
            f"{gaps[1]} |"
        )
        if "ensemble_image_accuracy" in g:
            lines.append(
                f"| its collapsed ensemble | | | | {len(per)} | | {pct(g['ensemble_image_accuracy'])} | "
                f"{pct(g['ensemble_treatment_accuracy'])} | | |"
            )
    lines.append(
        f"\nTarget {pct(c['target'])} (epochs to it on the mean curve): "
        + ", ".join(
            f"{g['name']} {g['epochs_to_target']:g}" for g in result["groups"] if g["epochs_to_target"] is not None
        )
        + (" (no other run reached it)" if any(g["epochs_to_target"] is None for g in result["groups"]) else "")
    )
    return "\n".join(lines) + "\n"


def conclusions(rows: list[dict], base_batch: int, target: float, runs: list[dict]) -> dict:
    """Per recipe: for each batch the gap to the base batch of the first recipe (the reference) and to its own
    base batch, and whether it is within 1 point; per PowerSGD run the gap to the same run without it. ``rows``:
    the runs with their replicas merged (``merge_seeds``), so every accuracy is a mean over its seeds; a PowerSGD
    run is compared with the plain run of the same seed(s) among ``runs`` (the unmerged runs) when every seed has
    one, else with the plain run's mean."""
    singles = [r for r in rows if not r["cycles"] and not r.get("comm") and not r.get("batch_schedule")]
    reference = next(r for r in singles if r["global_batch"] == base_batch)
    out = dict(reference=reference["name"], reference_best=reference["best_val_accuracy"], target=target)
    for recipe in dict.fromkeys(r["recipe"] for r in singles):
        mine = sorted((r for r in singles if r["recipe"] == recipe), key=lambda r: r["global_batch"])
        gaps = {r["global_batch"]: round(reference["best_val_accuracy"] - r["best_val_accuracy"], 4) for r in mine}
        own = {r["global_batch"]: round(mine[0]["best_val_accuracy"] - r["best_val_accuracy"], 4) for r in mine}
        within = [b for b, g in gaps.items() if g <= 0.01]
        out[recipe] = dict(
            gap_to_reference=gaps,
            within_1_point=within,
            gap_to_own_base=own,
            seeds={r["global_batch"]: len(r.get("seeds", [0])) for r in mine},
            within_1_point_of_own_base=[b for b, g in own.items() if g <= 0.01],
            breaks_down_at=next((b for b, g in gaps.items() if g > 0.01), None),
        )
    for r in rows:
        own = next((p for p in singles if (p["recipe"], p["global_batch"]) == (r["recipe"], base_batch)), None)
        if r.get("batch_schedule") and own:  # a growing batch: against the base batch, as the constant runs
            gaps = dict(
                gap_to_own_base=round(own["best_val_accuracy"] - r["best_val_accuracy"], 4),
                gap_to_reference=round(reference["best_val_accuracy"] - r["best_val_accuracy"], 4),
            )
            out.setdefault("ramp", {})[r["name"]] = dict(
                gaps,
                batch_schedule=r["batch_schedule"],
                seeds=len(r.get("seeds", [0])),
                within_1_point_of_own_base=gaps["gap_to_own_base"] <= 0.01,
                within_1_point=gaps["gap_to_reference"] <= 0.01,
            )
        plain = next((p for p in singles if (p["recipe"], p["global_batch"]) == (r["recipe"], r["global_batch"])), None)
        if r.get("comm") and plain:
            same_seed = [p for p in runs if p.get("group") == plain["name"] and p.get("seed") in r.get("seeds", [])]
            base = (
                np.mean([p["best_val_accuracy"] for p in same_seed])
                if len(same_seed) == len(r.get("seeds", []))
                else plain["best_val_accuracy"]
            )
            out.setdefault("powersgd_cost", {})[r["name"]] = round(float(base) - r["best_val_accuracy"], 4)
    return out


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    colors: dict[str, str] = {}  # a run's replicas (other seeds) share its colour, thinner and unlabelled
    for r in rows:
        group = r.get("group", r["name"])
        label = (
            f"{r['recipe']} x{r['multiplier']:g} ({r['global_batch']})"
            + (" ens" if r["cycles"] else "")
            + (f" {r['comm']}" if r.get("comm") else "")
            + (f" growing from {r['batch_schedule'][0][1]}" if r.get("batch_schedule") else "")
        )
        style = dict(color=colors[group], lw=0.7, alpha=0.6) if group in colors else dict(label=label)
        (line,) = axes[0].plot(r["train_epoch"], r["train_loss"], **style)
        colors.setdefault(group, line.get_color())
        style.setdefault("color", colors[group])
        axes[1].plot(r["val_epoch"], r["val_loss"], **style)
        axes[2].plot(r["val_epoch"], r["val_accuracy"], **style)
    for ax, title in zip(axes, ("training loss (epoch mean)", "validation loss", "validation accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def named_runs(flag: str, spec: str, names) -> list[str]:
    """The run names of ``spec`` (comma-separated) for the option ``flag``; an unknown one is an error that lists
    the study's runs (``names``)."""
    chosen = [x for x in spec.split(",") if x]
    unknown = [x for x in chosen if x not in names]
    if unknown:
        raise SystemExit(f"{flag} {','.join(unknown)}: not a run of this study; its runs: {', '.join(names)}")
    return chosen


def study_plan(a) -> list[tuple[str, int, int, str, bool, int]]:
    """The runs, in order: (recipe, global batch, cycles, train.comm or "", the --ramp run or not, seed); the
    replicas (``--replicas``) come after the study's runs."""
    plan, largest = [], a.base_batch
    for recipe in a.recipes.split(","):
        batches = sorted({a.base_batch} | {a.base_batch * m for m in multipliers(a.multipliers, recipe)})
        largest = max(largest, batches[-1])
        # the base batch, then the largest first: the key comparison comes early
        plan += [(recipe, b, 0, "", False) for b in batches[:1] + batches[:0:-1]]
    if a.cycles > 0:  # the collapsed ensemble's runs
        plan += [
            (a.ensemble_recipe, b, a.cycles, "", False)
            for b in [int(x) for x in a.ensemble_batches.split(",") if x] or [largest]
        ]
    plan += [(r, int(b), 0, "powersgd", False) for r, b in (x.split(":") for x in a.powersgd.split(",") if x)]
    ramp_recipe, ramp = ramp_schedule(a.ramp)
    if ramp:  # checked before any run trains
        from mcnn_jax.optim.batch_schedule import parse

        if ramp[0][1] != a.base_batch:
            raise SystemExit(f"--ramp {a.ramp}: it must start at the base batch ({a.base_batch}), its own base")
        try:
            parse(ramp, ramp[-1][1], a.epochs)  # the ramp run has no cycles: its main run is all --epochs
        except ValueError as e:
            raise SystemExit(f"--ramp {a.ramp}: {e}") from None
        plan.append((ramp_recipe, ramp[-1][1], 0, "", True))
    names = {run_name(a, *run): run for run in plan}
    chosen = named_runs("--replicate", a.replicate, names) or list(names)
    seeds = [int(s) for s in a.replicas.split(",") if s]
    if a.seed in seeds:
        raise SystemExit(f"--replicas {a.replicas}: {a.seed} is --seed, the study's own runs")
    return [run + (a.seed,) for run in plan] + [names[n] + (s,) for s in seeds for n in chosen]


def main(argv=None):
    a = parse_args(argv)
    from mcnn_jax.data import open_store, prepare_synthetic_store, split_indices
    from mcnn_jax.runtime import enable_compilation_cache

    enable_compilation_cache()
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = a.store or prepare_synthetic_store(
        out / "data", a.images, a.classes, a.size, a.size, seed=a.seed, difficulty=a.difficulty, progress=False
    )
    store = open_store(path)
    _, val_idx = split_indices(store, make_config(a, str(path), a.recipes.split(",")[0], a.base_batch).data)
    plan = study_plan(a)
    if a.only:  # train just these runs (e.g. one per process or machine), then stop: no report
        names = {run_name(a, *run): run for run in plan}
        for name in named_runs("--only", a.only, names):
            run_one(a, out, store, val_idx, *names[name])
        print(
            f"trained {a.only} in {out / 'runs'}; the same command without --only reuses them and writes the report",
            file=sys.stderr,
        )
        return None
    rows = []
    for run in plan:  # study.json is rewritten after every run: a partial study is readable
        rows.append(run_one(a, out, store, val_idx, *run))
        result = report(
            a,
            out,
            rows,
            dict(
                store=str(path),
                val_images=len(val_idx),
                wall_s=time.perf_counter() - t0,
                runs_planned=len(plan),
                complete=len(rows) == len(plan),
            ),
        )
    print(
        json.dumps(
            dict(
                conclusions=result["conclusions"],
                runs=[
                    {k: r[k] for k in ("name", "best_val_accuracy", "epochs_to_target", "final", "images_per_s")}
                    | ({"ensemble": r["ensemble"]} if "ensemble" in r else {})
                    for r in rows
                ],
                groups=[
                    {
                        k: g[k]
                        for k in ("name", "seeds", "best_val_accuracy", "best_val_accuracy_sd", "epochs_to_target")
                    }
                    for g in result["groups"]
                ],
            ),
            indent=1,
            default=float,
        )
    )
    return result


def report(a, out: Path, rows: list[dict], extra: dict) -> dict:
    """Epochs to the target, the conclusions, study.json (atomically) and study.png of the runs so far. ``groups``
    in study.json: the runs with their replicas merged (``merge_seeds``), on which the conclusions are drawn."""
    groups = merge_seeds(rows)
    target = a.target or round(groups[0]["best_val_accuracy"] - 0.01, 4)
    for r in rows + groups:
        r["epochs_to_target"] = epochs_to(r, target)
    result = dict(
        args=vars(a), **extra, conclusions=conclusions(groups, a.base_batch, target, rows), groups=groups, runs=rows
    )
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float))
    os.replace(tmp, out / "study.json")
    plot(rows, out / "study.png")
    (out / "study.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
