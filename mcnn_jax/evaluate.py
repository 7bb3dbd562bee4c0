"""Evaluation: the ``Evaluator`` the training loop calls, and ``mcnn-eval``, which evaluates a saved model on a
store and prints accuracy and the confusion matrix.

    mcnn-eval --workdir runs/default [--checkpoint best|latest|STEP] [--store PATH] [--split val|train|all]
    mcnn-eval --workdir runs/default --checkpoint snapshots     # the collapsed ensemble (optim.cycles > 0)
    mcnn-eval --workdir runs/default --checkpoint 120,160,200   # any ensemble of checkpoints

An ensemble (several checkpoints) predicts with the mean of its members' class probabilities.

In a notebook, ``load_model(workdir)`` gives the model, its parameters and the checkpoint's metadata:

    from mcnn_jax.evaluate import load_model
    model, params, meta = load_model("runs/default", checkpoint="best")
    logits = model.apply({"params": params}, images)  # images: float32 [N, H, W, C] in [0, 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from .checkpoint import Checkpointer
from .distributed import World
from .models import from_config, init_params


class Evaluator:
    """Loss, accuracy, per-class accuracy and the confusion matrix (rows: true class) of ``params`` (or of an
    ensemble: a list of parameter trees, whose probabilities are averaged) over one pass of ``reader``, summed
    over the MPI ranks (each rank evaluates its share of every batch)."""

    def __init__(self, model, reader, num_classes: int, world: World | None = None):
        from .step import make_eval_step
        self.reader, self.num_classes, self.world = reader, num_classes, world or World()
        self.eval_step = make_eval_step(model, num_classes)

    def run(self, params) -> dict:
        members = list(params) if isinstance(params, (list, tuple)) else [params]
        confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        loss_sum = 0.0
        for _, batch in self.reader.iterate():
            metrics, pred = self.eval_step(members, batch)
            mask = batch["mask"] > 0
            np.add.at(confusion, (batch["label"][mask], np.asarray(pred)[mask]), 1)
            loss_sum += float(metrics["loss_sum"])
        confusion = self.world.allreduce_host_sum(confusion)
        loss_sum = self.world.allreduce_host_sum(loss_sum)
        count = confusion.sum()
        per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
        return dict(loss=loss_sum / max(count, 1), accuracy=confusion.trace() / max(count, 1),
                    per_class_accuracy=per_class, confusion=confusion, count=int(count))


def load_model(workdir, checkpoint: str | int = "best"):
    """(model, params, meta) of a checkpoint in ``workdir``: ``best``, ``latest`` or a step number."""
    model, members, metas = load_ensemble(workdir, checkpoint)
    if len(members) != 1:
        raise ValueError(f"{checkpoint!r} names {len(members)} checkpoints; load_ensemble loads an ensemble")
    return model, members[0], metas[0]


def load_ensemble(workdir, checkpoints: str | int = "snapshots"):
    """(model, [params], [meta]) of the checkpoints in ``workdir`` that ``checkpoints`` names: ``snapshots`` (the
    collapsed ensemble), or a comma-separated list of ``best``, ``latest`` and step numbers."""
    ckpt = Checkpointer(workdir, write=False)
    try:
        if not ckpt.steps():
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
        steps = ckpt.resolve_members(str(checkpoints))
        config = ml_collections.ConfigDict(ckpt.meta(steps[0])["config"])
        model = from_config(config.model, num_classes=ckpt.meta(steps[0])["num_classes"])
        from .optim import make_optimizer, make_schedule
        from .step import create_state
        tx = make_optimizer(config.optim, make_schedule(config.optim, 1, config.train.global_batch))
        # the state's structure, shapes and dtypes only: nothing is initialised or compiled
        abstract = jax.eval_shape(lambda: create_state(
            init_params(model, jax.random.key(0), tuple(config.model.input_shape)), tx, config.seed))
        restored = [ckpt.restore(step, abstract) for step in steps]
    finally:
        ckpt.close()
    return model, [state.params for state, _ in restored], [meta for _, meta in restored]


def format_confusion(confusion: np.ndarray, class_names) -> str:
    width = max(5, max(len(n) for n in class_names) + 1)
    lines = ["true \\ predicted".ljust(width) + "".join(f"{i:>6d}" for i in range(len(class_names)))]
    for i, name in enumerate(class_names):
        lines.append(f"{i:>2d} {name}"[:width].ljust(width) + "".join(f"{v:>6d}" for v in confusion[i]))
    return "\n".join(lines)


def run(argv=None):
    parser = argparse.ArgumentParser(prog="mcnn-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, a step number, or an "
                        "ensemble: snapshots (the collapsed ensemble's) or a comma-separated list of the former")
    parser.add_argument("--store", default="", help="another store to evaluate on (default: the run's)")
    parser.add_argument("--split", default="val", choices=("val", "train", "all"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    from .runtime import enable_compilation_cache
    enable_compilation_cache()
    try:
        result = evaluate_checkpoint(args.workdir, args.checkpoint, args.store, args.split, args.batch)
    except (FileNotFoundError, ValueError) as e:
        print(f"mcnn-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}))
        return
    what = (f"checkpoint step {result['step']}" if len(result["members"]) == 1 else
            f"ensemble of {len(result['members'])} checkpoints (steps {', '.join(map(str, result['members']))})")
    print(f"{what} of {args.workdir}; {result['count']} images of {result['store']} ({args.split})")
    print(f"accuracy {result['accuracy']:.4f}   loss {result['loss']:.4f}")
    for name, acc in zip(result["class_names"], result["per_class_accuracy"]):
        print(f"  {name:<28s} {acc:.4f}")
    print(format_confusion(np.asarray(result["confusion"]), result["class_names"]))


def evaluate_checkpoint(workdir, checkpoint="best", store="", split="val", batch=8) -> dict:
    from .data import Reader, open_store, split_indices
    from .data.prepare import store_path

    model, members, metas = load_ensemble(workdir, checkpoint)
    meta = metas[-1]
    config = ml_collections.ConfigDict(meta["config"])
    path = Path(store) if store else store_path(config, workdir)
    st = open_store(path)
    if list(st.class_names) != list(meta["class_names"]):
        raise ValueError(f"the store {path} has classes {st.class_names}, the model was trained on "
                         f"{meta['class_names']}")
    if split == "all":
        idx = np.arange(st.num_images)
    else:
        train_idx, val_idx = split_indices(st, config.data)
        idx = val_idx if split == "val" else train_idx
    reader = Reader(st, idx, batch, augment=None, train=False)
    try:
        ev = Evaluator(model, reader, len(st.class_names)).run(members)
    finally:
        reader.close()
    return dict(ev, step=meta["step"], members=[m["step"] for m in metas], store=str(path),
                class_names=list(st.class_names))


if __name__ == "__main__":
    run()
