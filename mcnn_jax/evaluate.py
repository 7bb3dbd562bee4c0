"""Evaluation: the ``Evaluator`` the training loop calls, and ``mcnn-eval``, which evaluates a saved model on a
store and prints accuracy and the confusion matrix.

    mcnn-eval --workdir runs/default [--checkpoint best|latest|STEP] [--store PATH] [--split val|train|all]
              [--predictions FILE.csv|FILE.parquet]

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
    """Loss, accuracy, per-class accuracy and the confusion matrix (rows: true class) of ``params`` over one
    pass of ``reader``, summed over the MPI ranks (each rank evaluates its share of every batch)."""

    def __init__(self, model, reader, num_classes: int, world: World | None = None):
        from .step import make_eval_step
        self.reader, self.num_classes, self.world = reader, num_classes, world or World()
        self.eval_step = make_eval_step(model, num_classes)

    def run(self, params) -> dict:
        confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        loss_sum = 0.0
        for _, batch in self.reader.iterate():
            metrics, pred = self.eval_step(params, batch)
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
    ckpt = Checkpointer(workdir, write=False)
    if not ckpt.steps():
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    step = ckpt.resolve(checkpoint)
    saved = ckpt.meta(step)
    config = ml_collections.ConfigDict(saved["config"])
    model = from_config(config.model, num_classes=saved["num_classes"])
    from .optim import make_optimizer, make_schedule
    from .step import create_state
    tx = make_optimizer(config.optim, make_schedule(config.optim, 1, config.train.global_batch))
    # the state's structure, shapes and dtypes only: nothing is initialised or compiled
    abstract = jax.eval_shape(lambda: create_state(
        init_params(model, jax.random.key(0), tuple(config.model.input_shape)), tx, config.seed))
    state, meta = ckpt.restore(step, abstract)
    ckpt.close()
    return model, state.params, meta


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
    parser.add_argument("--checkpoint", default="best", help="best (default), latest or a step number")
    parser.add_argument("--store", default="", help="another store to evaluate on (default: the run's)")
    parser.add_argument("--split", default="val", choices=("val", "train", "all"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--predictions", default="", help="write one row per image (Metadata_*, true and "
                        "predicted class, P_<class> probabilities) to this CSV or .parquet file, and print "
                        "treatment-level and per-compound accuracy (mcnn_jax.embed)")
    args = parser.parse_args(argv)
    from .runtime import enable_compilation_cache
    enable_compilation_cache()
    try:
        if args.predictions:
            from .embed import evaluate_to_table
            result = evaluate_to_table(args.workdir, args.checkpoint, args.store, args.split, args.batch,
                                       args.predictions)
        else:
            result = evaluate_checkpoint(args.workdir, args.checkpoint, args.store, args.split, args.batch)
    except (FileNotFoundError, ValueError) as e:
        print(f"mcnn-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    treatments = result.pop("treatment_summary", False)
    if args.json:
        print(json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}))
        return
    print(f"checkpoint step {result['step']} of {args.workdir}; {result['count']} images of {result['store']} "
          f"({args.split})")
    print(f"accuracy {result['accuracy']:.4f}   loss {result['loss']:.4f}")
    for name, acc in zip(result["class_names"], result["per_class_accuracy"]):
        print(f"  {name:<28s} {acc:.4f}")
    print(format_confusion(np.asarray(result["confusion"]), result["class_names"]))
    if treatments is not False:
        from .embed import format_treatment_summary
        print(f"predictions written to {result['predictions']}")
        print(format_treatment_summary(treatments))


def evaluate_checkpoint(workdir, checkpoint="best", store="", split="val", batch=8) -> dict:
    from .data import Reader, open_store, split_indices
    from .data.prepare import store_path

    model, params, meta = load_model(workdir, checkpoint)
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
        ev = Evaluator(model, reader, len(st.class_names)).run(params)
    finally:
        reader.close()
    return dict(ev, step=meta["step"], store=str(path), class_names=list(st.class_names))


if __name__ == "__main__":
    run()
