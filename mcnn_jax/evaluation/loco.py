"""``mcnn-loco``: the leave-one-compound-out protocol, whole: one training per held-out compound, then one report.

    mcnn-loco --config configs/default.py --workdir runs/loco [--compounds A,B,... | --fold K] [--config.KEY=VALUE ...]
    mcnn-loco --config configs/default.py --workdir runs/loco --list      # the folds
    mcnn-loco --config configs/default.py --workdir runs/loco --report [--normalize tvn,coral] [--level well]
    mcnn-loco ... --checkpoint snapshots --config.optim.cycles=3           # each fold's collapsed ensemble

Every compound of the store except the control (DMSO) is one fold, numbered in sorted order. Fold K trains
``mcnn-train`` in ``WORKDIR/folds/KK-<compound>/`` with ``data.split=compound``, ``data.holdout_compound=<compound>``
and ``train.target_accuracy=0`` (stopping on the held-out compound's accuracy would select on the test set;
your overrides come after and win), then evaluates the fold's **latest** checkpoint (by default, not the best
by validation accuracy, for the same reason; an ensemble: see ``--checkpoint`` below): the held-out images'
predictions (``predictions.parquet``) and the embeddings of every image by the fold's model
(``embeddings.parquet``, layer ``--layer``). Every fold trains on the store ``mcnn-train`` would prepare for the
config (``data.prepare.prepare_store``), and records its fingerprint. ``FOLD_COMPLETE.json``, written last and
atomically, marks a finished fold:
rerunning skips finished folds and resumes an interrupted one (the trainer resumes from its latest checkpoint;
``train_wall_s`` adds up the attempts, read from the fold's ``metrics.jsonl``). ``--fold K`` runs one fold (a
SLURM array task: ``launch/loco.sbatch``).

``--checkpoint snapshots`` (with ``--config.optim.cycles=N``: every fold ends with the collapsed ensemble's
cosine-restart cycles) or ``--checkpoint STEP,STEP,...`` evaluates an ensemble of each fold's checkpoints
instead: ``predictions.parquet`` holds the mean of the members' class probabilities (the predicted class is its
argmax), and the embeddings are the members' features side by side (``hidden_m0_000``..., ``hidden_m1_000``...;
member k is the k-th of the fold's ``members``), **concatenated, not averaged**: each snapshot learned its own
feature space (unit j of one need not mean what unit j of another means: the spaces need not be aligned), so a
mean of features would mix unrelated units, while the concatenation keeps every member's space whole (a cosine
similarity over it adds up the members' dot products). ``best`` is refused (it is picked on the held-out
compound). The checkpoint steps used are recorded in ``FOLD_COMPLETE.json`` (``checkpoint``, ``members``) and
per fold in the report; a finished fold asked for with another ``--checkpoint`` is evaluated again (not trained
again).

When every fold is finished (or with ``--report``) the merged report is written: ``loco_report.json`` (per-fold
accuracy; pooled image, treatment-level and per-compound accuracy; NSC, NSCB and mAP; the confusion matrix; the
classes with a single compound, whose fold cannot be right because no other compound of the class is left to
train on), ``loco_predictions.parquet``, ``loco_neighbours.csv`` and ``loco_ap.csv``. NSC / NSCB and mAP are
computed by the report from each fold's embeddings (the held-out compound's treatments as the queries in its
fold's embedding, pooled over the folds), with ``mcnn-profile-eval``'s options (``--normalize``, ``--level``,
``--nscb-rule``, ...), so a finished run can be reported again with other options. Folds evaluated on a store
whose fingerprint differs from the current one are refused, by name.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mcnn_jax.data import open_store
from mcnn_jax.data.prepare import prepare_store, store_path
from mcnn_jax.data.store import is_complete
from mcnn_jax.evaluation import profiles as P
from mcnn_jax.evaluation.embed import write_image_table
from mcnn_jax.evaluation.evaluate import confusion_summary, format_confusion
from mcnn_jax.evaluation.profile_metrics import (
    MODES,
    ProfileOptions,
    format_profile_report,
    fraction,
    profile_parts,
    summarize_parts,
    to_json,
)
from mcnn_jax.evaluation.run import EVAL_BATCH, open_run
from mcnn_jax.parallel.world import World

MARKER = "FOLD_COMPLETE.json"


class LocoError(ValueError):
    """Bad input for the protocol (a store without compounds, an unknown compound, a failed fold)."""


# --- folds -----------------------------------------------------------------------------------------------------
def fold_compounds(store, control: str = P.CONTROL) -> list[str]:
    """The store's compounds except the control, sorted: fold K holds out the K-th."""
    if not store.compounds:
        raise LocoError(
            f"the store {store.path} records no compounds (no 'compound' metadata; a folder import "
            f"has none): leave-one-compound-out needs them"
        )
    folds = [c for c in store.compounds if c != control]
    if not folds:
        raise LocoError(f"the store {store.path} has no compound besides the control {control!r}")
    return folds


def fold_dir(workdir, compounds: list[str], compound: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", compound).strip("_") or "compound"
    return Path(workdir) / "folds" / f"{compounds.index(compound):02d}-{safe}"


def select(compounds: list[str], names: str = "", fold: int | None = None, store_path="the store") -> list[str]:
    if fold is not None:
        if not 0 <= fold < len(compounds):
            raise LocoError(
                f"--fold {fold} is out of range: {store_path} has {len(compounds)} folds (0.."
                f"{len(compounds) - 1}; see --list)"
            )
        return [compounds[fold]]
    if not names:
        return list(compounds)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in compounds]
    if unknown:
        raise LocoError(
            f"compound(s) {', '.join(map(repr, unknown))} are not compounds of {store_path}; "
            f"choose from: {', '.join(compounds)}"
        )
    return chosen


def single_compound_classes(store, control: str = P.CONTROL) -> dict[str, str]:
    """{class: its only compound} for the classes that have one compound (besides the control)."""
    per_class: dict[str, set] = {}
    for cls, comp in zip(store.metadata.get("class", []), store.metadata.get("compound", [])):
        if comp and comp != control:
            per_class.setdefault(cls, set()).add(comp)
    return {k: next(iter(v)) for k, v in sorted(per_class.items()) if len(v) == 1}


# --- one fold --------------------------------------------------------------------------------------------------
def train_fold(config_file, fold_path: Path, store_path, compound: str, overrides, launcher: str = "") -> float:
    """Runs (or resumes) the fold's training in a subprocess; returns its wall time."""
    cmd = [
        *shlex.split(launcher),
        sys.executable,
        "-m",
        "mcnn_jax.cli.train",
        "--config",
        str(config_file),
        "--workdir",
        str(fold_path),
        f"--config.data.store={store_path}",
        "--config.data.split=compound",
        f"--config.data.holdout_compound={compound}",
        "--config.train.target_accuracy=0",
        *[f"--config.{o}" for o in overrides],
        "--config.data.montage.grid=",  # the store is the prepared one (a montage already, with data.montage)
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise LocoError(
            f"the training of fold {fold_path.name} (held-out compound {compound!r}) failed with exit "
            f"code {proc.returncode}; rerun the same command to resume it (command: "
            f"{shlex.join(cmd)})"
        )
    check_trained(fold_path, compound)
    return time.perf_counter() - t0


def check_trained(fold_path: Path, compound: str) -> None:
    """A training stopped by a signal (SIGTERM from a scheduler, Ctrl-C) exits cleanly with a checkpoint; its
    summary says so, and the fold must then be resumed, not evaluated."""
    try:
        summary = json.loads((fold_path / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise LocoError(
            f"fold {fold_path.name} (held-out compound {compound!r}): no readable summary.json after "
            f"its training ({e}); rerun the same command to resume it"
        ) from None
    if summary.get("preempted_at_step") is not None:
        raise LocoError(
            f"the training of fold {fold_path.name} (held-out compound {compound!r}) was stopped by a "
            f"signal at step {summary['preempted_at_step']} of {summary.get('total_steps')}; its "
            f"checkpoint is kept: rerun the same command to resume it"
        )


def earlier_train_wall_s(fold_path: Path) -> tuple[float, int]:
    """(seconds, number) of the fold's training attempts so far, from the trainer's ``metrics.jsonl``, which
    every attempt appends to: the ``wall`` clock of its records starts again at each attempt, and an attempt
    counts until its last record (a process killed between records loses the time since; process start-up
    before the trainer's clock is not counted)."""
    walls = []
    if (fold_path / "metrics.jsonl").is_file():
        for line in (fold_path / "metrics.jsonl").read_text().splitlines():
            try:
                wall = json.loads(line).get("wall")
            except ValueError:  # a line cut short by a killed attempt
                continue
            if isinstance(wall, (int, float)):
                walls.append(float(wall))
    if not walls:
        return 0.0, 0
    ends = [a for a, b in zip(walls, walls[1:]) if b < a] + [walls[-1]]
    return sum(ends), len(ends)


def open_fold(fold_path: Path, store_path, compound: str, checkpoint: str = "latest"):
    """``run.open_run`` of the fold's checkpoint(s) on its held-out images; errors name the fold."""
    try:
        run = open_run(fold_path, checkpoint, store_path, "val")
    except FileNotFoundError as e:
        hint = (
            " (mcnn-loco: add --config.optim.cycles=N, N > 0, and see optim.cycle_epochs, so that every fold "
            "ends with the collapsed ensemble's snapshots)"
            if checkpoint == "snapshots"
            else ""
        )
        raise LocoError(
            f"fold {fold_path.name} (held-out compound {compound!r}), --checkpoint {checkpoint}: {e}{hint}"
        ) from None
    comps = np.asarray(run.store.metadata["compound"], dtype=object)[run.indices]
    if set(comps) != {compound}:
        raise LocoError(f"fold {fold_path.name}: its validation images are of {sorted(set(comps))}, not {compound!r}")
    return run


def evaluate_fold(
    fold_path: Path,
    store_path,
    compound: str,
    layer="hidden",
    batch=EVAL_BATCH,
    control=P.CONTROL,
    checkpoint: str = "latest",
) -> dict:
    """The fold's latest model (or the ensemble ``checkpoint`` names: the mean of its members' probabilities,
    its members' features side by side) on its held-out compound (predictions) and on every image
    (embeddings, from which the report computes NSC / NSCB and mAP)."""
    run = open_fold(fold_path, store_path, compound, checkpoint)
    st = run.store
    pred = write_image_table(
        run.model, run.members, st, run.indices, fold_path / "predictions.parquet", "predictions", batch=batch
    )
    emb = write_image_table(
        run.model,
        run.members,
        st,
        np.arange(st.num_images),
        fold_path / "embeddings.parquet",
        "embeddings",
        layer,
        batch,
    )
    summary = P.prediction_summary(P.read_table(fold_path / "predictions.parquet"), control=control)
    conf = confusion_summary(pred["confusion"])
    return dict(
        compound=compound,
        step=run.steps[-1],
        checkpoint=checkpoint,
        members=run.steps,
        images=conf["count"],
        accuracy=conf["accuracy"],
        treatment_accuracy=summary["treatment_accuracy"],
        treatments=summary["treatments"],
        moa=str(summary["per_compound"][P.MOA].iloc[0]),
        confusion=conf["confusion"].tolist(),
        store_fingerprint=store_fingerprint(st),
        embed_images_per_s=emb["images_per_s"],
    )


def run_fold(args, overrides, store, compounds, compound, log=print) -> dict:
    """Trains (or resumes) and evaluates one fold; a finished fold is skipped, or only evaluated again if it
    was evaluated with another ``--checkpoint``."""
    path = fold_dir(args.workdir, compounds, compound)
    done = json.loads((path / MARKER).read_text()) if (path / MARKER).is_file() else None
    if done and done.get("checkpoint", "latest") == args.checkpoint:
        log(f"fold {path.name}: finished, skipped")
        return done
    if done:
        log(
            f"fold {path.name}: finished with --checkpoint {done.get('checkpoint', 'latest')}, evaluated again "
            f"with --checkpoint {args.checkpoint}"
        )
        train = {k: done.get(k) for k in ("train_wall_s", "train_attempts")}
    else:
        earlier_s, attempts = earlier_train_wall_s(path)
        log(
            f"fold {path.name}: training with {compound!r} held out"
            + (" (resuming)" if (path / "checkpoints").is_dir() else "")
        )
        train_s = train_fold(args.config, path, store.path, compound, overrides, args.launcher)
        train = dict(train_wall_s=earlier_s + train_s, train_attempts=attempts + 1)
    t0 = time.perf_counter()
    res = evaluate_fold(path, store.path, compound, args.layer, args.batch, args.control, args.checkpoint)
    res.update(train, eval_wall_s=time.perf_counter() - t0, overrides=list(overrides), layer=args.layer)
    P.write_json(res, path / MARKER)
    log(f"fold {path.name}: accuracy {res['accuracy']:.4f} on {res['images']} images of {compound!r}")
    return res


# --- the merged report -----------------------------------------------------------------------------------------
def _finished(workdir, compounds, only=None):
    done, missing = [], []
    for c in only or compounds:
        path = fold_dir(workdir, compounds, c)
        if (path / MARKER).is_file():
            done.append((path, json.loads((path / MARKER).read_text())))
        else:
            missing.append(c)
    if not done:
        raise LocoError(f"no finished fold in {Path(workdir) / 'folds'}: run the folds first")
    return done, missing


def _check_same_store(done, store) -> None:
    """Folds evaluated on a store whose recorded description differs from ``store``'s cannot be pooled with it
    (folds finished before the fingerprint was recorded are taken as they are)."""
    fp = store_fingerprint(store)
    other = [p.name for p, f in done if f.get("store_fingerprint", fp) != fp]
    if other:
        raise LocoError(
            f"fold(s) {', '.join(other)} were trained and evaluated on another store than {store.path} (it has "
            f"changed since, e.g. a synthetic screen rebuilt with other settings): their results cannot be pooled "
            f"with this store's; delete those fold folders and run them again"
        )


def merged_report(workdir, store, compounds, opts: ProfileOptions = ProfileOptions(), only=None) -> dict:
    """Pools the finished folds of ``only`` (default: all ``compounds``; see the module docstring); writes the
    report files into ``workdir``. NSC / NSCB and mAP are computed here from each fold's embeddings, with
    ``opts`` (normalisation, level, NSCB rule), so a finished run can be reported with other options."""
    workdir = Path(workdir)
    control = opts.control
    done, missing = _finished(workdir, compounds, only)
    _check_same_store(done, store)
    preds = pd.concat([P.read_table(p / "predictions.parquet") for p, _ in done], ignore_index=True)
    summary = P.prediction_summary(preds, control=control)
    parts = [
        profile_parts(
            P.read_table(p / "embeddings.parquet"), opts, str(p / "embeddings.parquet"), query_compounds=[f["compound"]]
        )
        for p, f in done
    ]
    profiles = summarize_parts(parts, opts)
    single = single_compound_classes(store, control)
    per_fold = [
        dict(
            fold=p.name,
            compound=f["compound"],
            moa=f["moa"],
            images=f["images"],
            accuracy=f["accuracy"],
            treatment_accuracy=f["treatment_accuracy"],
            **{m: P.nn_accuracy(part["matches"][m])["accuracy"] for m in MODES},
            step=f["step"],
            checkpoint=f.get("checkpoint", "latest"),
            members=f.get("members", [f["step"]]),
            train_wall_s=f["train_wall_s"],
            train_attempts=f.get("train_attempts"),
            eval_wall_s=f["eval_wall_s"],
            single_compound_class=f["moa"] in single,
        )
        for (p, f), part in zip(done, parts)
    ]
    multi = preds[~preds[P.MOA].isin(list(single))]
    report = dict(
        folds_total=len(only or compounds),
        folds_finished=len(done),
        folds_missing=missing,
        images=len(preds),
        image_accuracy=summary["image_accuracy"],
        treatments=summary["treatments"],
        treatment_accuracy=summary["treatment_accuracy"],
        image_accuracy_without_single_compound_classes=float((multi[P.MOA] == multi[P.PREDICTED]).mean())
        if len(multi)
        else None,
        **{k: v for k, v in to_json(profiles).items() if k not in MODES},
        **{m: {k: v for k, v in profiles[m].items() if k != "matches"} for m in MODES},
        single_compound_classes=single,
        class_names=list(store.class_names),
        checkpoint=sorted({f["checkpoint"] for f in per_fold}),
        confusion=np.sum([np.asarray(f["confusion"]) for _, f in done], axis=0).tolist(),
        wall_s=sum(f["train_wall_s"] + f["eval_wall_s"] for _, f in done),
        per_fold=per_fold,
        per_compound=json.loads(summary["per_compound"].to_json(orient="records")),
    )
    P.write_table(preds, workdir / "loco_predictions.parquet")
    P.write_table(
        pd.concat([profiles[m]["matches"].assign(mode=m) for m in MODES], ignore_index=True),
        workdir / "loco_neighbours.csv",
    )
    if opts.map:
        P.write_table(
            pd.concat(
                [
                    pd.concat([part["ap"][k] for part in parts], ignore_index=True).assign(metric=k)
                    for k in ("activity", *MODES)
                ],
                ignore_index=True,
            ),
            workdir / "loco_ap.csv",
        )
    P.write_json(report, workdir / "loco_report.json")
    return report


def format_loco_report(r: dict) -> str:
    lines = [
        f"leave-one-compound-out: {r['folds_finished']} of {r['folds_total']} folds finished"
        + (f" (missing: {', '.join(r['folds_missing'])})" if r["folds_missing"] else "")
        + f"; evaluated checkpoint(s): {', '.join(r['checkpoint'])}"
    ]
    lines += [
        f"  {f['fold']:<24s} {f['moa']:<24s} {f['images']:>5d} images  accuracy {fraction(f['accuracy'])}  "
        f"treatments {fraction(f['treatment_accuracy'])}  NSC {fraction(f['nsc'])}  NSCB {fraction(f['nscb'])}"
        + f"  step(s) {','.join(map(str, f['members']))}"
        + ("  (single-compound class)" if f["single_compound_class"] else "")
        for f in r["per_fold"]
    ]
    lines += [
        f"image accuracy {fraction(r['image_accuracy'])} over {r['images']} held-out images; without the "
        f"single-compound classes {fraction(r['image_accuracy_without_single_compound_classes'])}",
        f"treatment-level accuracy {fraction(r['treatment_accuracy'])} over {r['treatments']} treatments",
        format_profile_report(r, matches=False),
        "classes with a single compound (their fold has no other compound of the class to learn from): "
        + (", ".join(f"{k} ({v})" for k, v in r["single_compound_classes"].items()) or "none"),
        f"wall time {r['wall_s']:.1f} s (training + evaluation of the finished folds)",
        format_confusion(np.asarray(r["confusion"]), r["class_names"]),
    ]
    return "\n".join(lines)


# --- the command line ------------------------------------------------------------------------------------------


def open_loco_store(config, workdir, prepare: bool = True):
    """The config's store, prepared as the trainer prepares it (``data.prepare.prepare_store``: ``data.store``, or
    the config's synthetic screen, camera and difficulty included, generated once into ``WORKDIR/data``), so
    every fold trains on the store that ``mcnn-train`` with the same config would. ``prepare=False`` (``--report``,
    ``--list``) opens a store that is already there as it is, without generating or rebuilding it."""
    if not config.data.store and not config.data.synthetic.enabled:
        raise LocoError("the config names no store (data.store) and no synthetic screen (data.synthetic.enabled)")
    path = store_path(config, workdir)
    if not prepare and is_complete(path):
        return open_store(path)
    return prepare_store(config, workdir, World())


def store_fingerprint(store) -> str:
    """A short hash of a store's recorded description (its info: images, classes, import or synthetic
    parameters): a fold records the store it was trained and evaluated on."""
    return hashlib.sha256(json.dumps(store.info, sort_keys=True, default=str).encode()).hexdigest()[:16]
