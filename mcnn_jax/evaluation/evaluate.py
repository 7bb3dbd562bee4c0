"""Evaluation: the ``Evaluator`` the training loop calls (and ``mcnn-eval``, ``mcnn_jax.cli.evaluate``, through
``evaluate_checkpoint``): loss, accuracy, per-class accuracy and the confusion matrix of a model or of an
ensemble (several checkpoints: the mean of their class probabilities), and treatment-level accuracy where the
evaluated images hold whole treatments. Opening a trained run: ``mcnn_jax.evaluation.run``.
"""

from __future__ import annotations

import numpy as np

from mcnn_jax.data import Reader
from mcnn_jax.evaluation.forward import reader_outputs
from mcnn_jax.evaluation.profiles import treatment_accuracy
from mcnn_jax.evaluation.run import EVAL_BATCH, open_run
from mcnn_jax.parallel.world import World


class Evaluator:
    """Loss, accuracy, per-class accuracy and the confusion matrix (rows: true class) of ``params`` (or of an
    ensemble: a list of parameter trees, whose probabilities are averaged) over one pass of ``reader``
    (``forward.reader_outputs``), summed over the MPI ranks (each rank evaluates its share of every batch); and,
    when the evaluated images hold every image of each of their treatments (compound x concentration, e.g. a
    held-out compound), the treatment-level accuracy: each treatment's mean class probabilities against its class."""

    def __init__(self, model, reader, num_classes: int, world: World | None = None):
        self.model, self.reader, self.num_classes, self.world = model, reader, num_classes, world or World()
        self.labels = np.asarray(reader.store.labels)[reader.indices]
        self.treatments = whole_treatments(reader.store, reader.indices)

    def run(self, params) -> dict:
        confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        probs = np.zeros((len(self.reader.indices), self.num_classes), np.float64)
        loss_sum = 0.0
        for positions, log_probs, _ in reader_outputs(self.model, params, self.reader):
            loss_sum += tally(confusion, self.labels[positions], log_probs)
            probs[positions] = np.exp(log_probs)
        confusion = self.world.allreduce_host_sum(confusion)
        loss_sum = self.world.allreduce_host_sum(loss_sum)
        out = dict(confusion_summary(confusion), loss=loss_sum / max(confusion.sum(), 1))
        if self.treatments is not None:
            probs = self.world.allreduce_host_sum(probs)  # each image's row is filled on one rank
            out.update(treatment_accuracy(probs, self.labels, *self.treatments))
        return out


def tally(confusion: np.ndarray, labels, log_probs) -> float:
    """Adds images (true ``labels``, class ``log_probs`` [N, classes]) to ``confusion`` (rows: the true class) and
    returns the sum of their cross-entropies (in float64)."""
    np.add.at(confusion, (labels, log_probs.argmax(-1)), 1)
    return -float(np.take_along_axis(np.asarray(log_probs, np.float64), np.asarray(labels)[:, None], 1).sum())


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


def confusion_summary(confusion: np.ndarray) -> dict:
    """Accuracy, per-class accuracy (rows: the true class), the image count and the confusion matrix itself."""
    count = int(confusion.sum())
    return dict(
        accuracy=float(confusion.trace() / max(count, 1)),
        per_class_accuracy=confusion.diagonal() / np.maximum(confusion.sum(1), 1),
        count=count,
        confusion=confusion,
    )


def format_confusion(confusion: np.ndarray, class_names) -> str:
    width = max(5, max(len(n) for n in class_names) + 1)
    lines = ["true \\ predicted".ljust(width) + "".join(f"{i:>6d}" for i in range(len(class_names)))]
    for i, name in enumerate(class_names):
        lines.append(f"{i:>2d} {name}"[:width].ljust(width) + "".join(f"{v:>6d}" for v in confusion[i]))
    return "\n".join(lines)


def evaluate_checkpoint(workdir, checkpoint="best", store="", split="val", batch=EVAL_BATCH) -> dict:
    """Loss, accuracy, per-class accuracy and confusion (``Evaluator``) of a run's checkpoint or ensemble
    (``run.open_run``) on the images of ``split`` of its store (or ``store``)."""
    run = open_run(workdir, checkpoint, store, split)
    reader = Reader(run.store, run.indices, batch, augment=None, train=False)
    try:
        ev = Evaluator(run.model, reader, len(run.store.class_names)).run(run.members)
    finally:
        reader.close()
    return dict(
        ev, step=run.steps[-1], members=run.steps, store=str(run.store.path), class_names=list(run.store.class_names)
    )
