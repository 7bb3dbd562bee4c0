"""Evaluation: the ``Evaluator`` the training loop calls, and ``mcnn-eval``, which evaluates a saved model on a
store and prints accuracy and the confusion matrix.

    mcnn-eval --workdir runs/default [--checkpoint best|latest|STEP] [--store PATH] [--split val|train|all]
              [--predictions FILE.csv|FILE.parquet]

    mcnn-eval --workdir runs/default --checkpoint snapshots     # the collapsed ensemble (optim.cycles > 0)
    mcnn-eval --workdir runs/default --checkpoint 120,160,200   # any ensemble of checkpoints

An ensemble (several checkpoints) predicts with the mean of its members' class probabilities.

In a notebook, ``load_model(workdir)`` gives the model, its parameters and the checkpoint's metadata:

    from mcnn_jax.evaluation.evaluate import load_model
    model, params, meta = load_model("runs/default", checkpoint="best")
    logits = model.apply({"params": params}, images)  # images: float32 [N, H, W, C] in [0, 1]
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np

from mcnn_jax.checkpoint import Checkpointer
from mcnn_jax.model.mcnn import from_config, init_params
from mcnn_jax.parallel.world import World


class Evaluator:
    """Loss, accuracy, per-class accuracy and the confusion matrix (rows: true class) of ``params`` (or of an
    ensemble: a list of parameter trees, whose probabilities are averaged) over one pass of ``reader``, summed
    over the MPI ranks (each rank evaluates its share of every batch); and, when the evaluated images hold every
    image of each of their treatments (compound x concentration, e.g. a held-out compound), the treatment-level
    accuracy: each treatment's mean class probabilities against its class."""

    def __init__(self, model, reader, num_classes: int, world: World | None = None):
        from mcnn_jax.step import make_eval_step

        self.reader, self.num_classes, self.world = reader, num_classes, world or World()
        self.eval_step = make_eval_step(model, num_classes)
        self.treatments = whole_treatments(reader.store, reader.indices)

    def run(self, params) -> dict:
        members = list(params) if isinstance(params, (list, tuple)) else [params]
        confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        probs = np.zeros((len(self.reader.indices), self.num_classes), np.float64)
        loss_sum = 0.0
        for step, batch in self.reader.iterate():
            metrics, p = self.eval_step(members, batch)
            p, mask = np.asarray(p), batch["mask"] > 0
            np.add.at(confusion, (batch["label"][mask], p.argmax(-1)[mask]), 1)
            probs[self.reader.batch_positions(step)[mask]] = p[mask]
            loss_sum += float(metrics["loss_sum"])
        confusion = self.world.allreduce_host_sum(confusion)
        loss_sum = self.world.allreduce_host_sum(loss_sum)
        count = confusion.sum()
        per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
        out = dict(
            loss=loss_sum / max(count, 1),
            accuracy=confusion.trace() / max(count, 1),
            per_class_accuracy=per_class,
            confusion=confusion,
            count=int(count),
        )
        if self.treatments is not None:
            from mcnn_jax.evaluation.profiles import treatment_accuracy

            probs = self.world.allreduce_host_sum(probs)  # each image's row is filled on one rank
            labels = np.asarray(self.reader.store.labels)[self.reader.indices]
            out.update(treatment_accuracy(probs, labels, *self.treatments))
        return out


def whole_treatments(store, indices):
    """(compounds, concentrations) of the images ``indices`` if the store records them and the images hold
    every image of each of their treatments; None otherwise (e.g. a random split cuts treatments in two)."""
    compound, conc = store.metadata.get("compound"), store.metadata.get("concentration")
    if not compound or not conc or not all(compound[i] for i in indices):
        return None
    keys = [(c, str(x)) for c, x in zip(compound, conc)]
    chosen = [keys[i] for i in indices]
    wanted = set(chosen)
    if sum(k in wanted for k in keys) != len(chosen):  # some image of a treatment is not among them
        return None
    return [k[0] for k in chosen], [float(k[1]) if _is_number(k[1]) else k[1] for k in chosen]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def predict_probabilities(model, members, reader) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, classes], labels [N]) of the images of one pass of an evaluation ``reader``, in its
    order (padding dropped): the mean of the ``members``' (a list of parameter trees) class probabilities."""
    from mcnn_jax.step import make_eval_step

    eval_step = make_eval_step(model, len(reader.store.class_names))
    probs, labels = [], []
    for _, batch in reader.iterate():
        keep = batch["mask"] > 0
        probs.append(np.asarray(eval_step(list(members), batch)[1])[keep])
        labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(probs), np.concatenate(labels)


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
        from mcnn_jax.optim import make_optimizer, make_schedule
        from mcnn_jax.step import create_state

        tx = make_optimizer(config.optim, make_schedule(config.optim, 1, config.train.global_batch))
        # the state's structure, shapes and dtypes only: nothing is initialised or compiled
        abstract = jax.eval_shape(
            lambda: create_state(
                init_params(model, jax.random.key(0), tuple(config.model.input_shape)), tx, config.seed
            )
        )
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


def evaluate_checkpoint(workdir, checkpoint="best", store="", split="val", batch=8) -> dict:
    from mcnn_jax.data import Reader, open_store, split_indices
    from mcnn_jax.data.prepare import store_path

    model, members, metas = load_ensemble(workdir, checkpoint)
    meta = metas[-1]
    config = ml_collections.ConfigDict(meta["config"])
    path = Path(store) if store else store_path(config, workdir)
    st = open_store(path)
    if list(st.class_names) != list(meta["class_names"]):
        raise ValueError(
            f"the store {path} has classes {st.class_names}, the model was trained on {meta['class_names']}"
        )
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
    return dict(
        ev, step=meta["step"], members=[m["step"] for m in metas], store=str(path), class_names=list(st.class_names)
    )
