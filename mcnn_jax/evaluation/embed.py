"""Per-image outputs of a trained M-CNN: features (embeddings) for profiling and class probabilities.

In a notebook, the features of a batch of images from loaded parameters:

    from mcnn_jax.evaluation.embed import features
    from mcnn_jax.evaluation.run import load_model
    model, params, meta = load_model("runs/default")
    f = features(model, params, images)                  # [N, head_width]: the hidden layer after its ReLU
    g = features(model, params, images, layer="merge")   # [N, merge_width]

Layers: ``hidden`` is the dense hidden layer after its ReLU (512-d in the published model; the output layer
is a linear map of it). ``merge`` is the 1x1 merge convolution after its ReLU and max-pool (the layer the
hidden layer reads), **averaged over its spatial grid** (8x10 at 1024x1280), giving ``merge_width`` (1024)
features that do not depend on the field size or on where in the field a phenotype is.

From the command line, one row per image (``Metadata_*`` columns, then ``hidden_000``...), streamed in batches
into a Parquet (``.parquet``) or CSV file written atomically:

    mcnn-embed --workdir runs/default --out emb.parquet [--layer hidden|merge] [--checkpoint best|latest|STEP]
               [--store PATH] [--split all|val|train]
    mcnn-embed --workdir runs/default --out emb.parquet --checkpoint snapshots    # or STEP,STEP,...: an ensemble

An ensemble's features are its members' side by side (``hidden_m0_000``..., ``hidden_m1_000``...; member k is
the k-th checkpoint), not their mean: each member learned its own feature space, and the spaces of different
snapshots need not be aligned unit by unit. Its probabilities are the mean of the members'.

``mcnn-eval --predictions FILE`` writes the same rows with the true and predicted class and the probability
of every class (``P_<class>``) instead of features (``write_image_table(..., kind="predictions")``).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mcnn_jax.evaluation import profiles as P
from mcnn_jax.evaluation.evaluate import confusion_summary, tally
from mcnn_jax.evaluation.forward import LAYERS, features, iter_outputs, predict_probabilities  # noqa: F401
from mcnn_jax.evaluation.run import EVAL_BATCH, as_members, open_run

# store metadata key -> table column (present only when the store records it)
METADATA_COLUMNS = {
    "plate": P.PLATE,
    "well": P.WELL,
    "site": P.SITE,
    "compound": P.COMPOUND,
    "concentration": P.CONCENTRATION,
}


# --- tables --------------------------------------------------------------------------------------------------
def image_metadata(store, indices) -> pd.DataFrame:
    """The ``Metadata_*`` columns of images ``indices`` of a store: the store index, then plate, well, site,
    compound and concentration where the store records them, then the true class (name and label)."""
    idx = np.asarray(indices, np.int64)
    cols = {P.INDEX: idx}
    for key, col in METADATA_COLUMNS.items():
        if key in store.metadata:
            values = np.asarray(store.metadata[key], dtype=object)[idx]
            cols[col] = values.astype({"concentration": float, "site": np.int64}.get(key, str))
    labels = np.asarray(store.labels)[idx]
    cols[P.MOA] = np.asarray(store.class_names, dtype=object)[labels].astype(str)
    cols["Metadata_Label"] = labels.astype(np.int64)
    return pd.DataFrame(cols)


class TableWriter:
    """Appends DataFrames to a Parquet (``.parquet``) or CSV file; the file appears (atomically renamed from a
    temp file) only when ``close()`` completes; on an error the temp file is removed."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.parquet = self.path.suffix == ".parquet"
        self._writer = None
        self.rows = 0

    def write(self, df: pd.DataFrame) -> None:
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.tmp, table.schema)
            self._writer.write_table(table)
        else:
            df.to_csv(self.tmp, mode="a" if self.rows else "w", header=not self.rows, index=False)
        self.rows += len(df)

    def close(self) -> Path:
        if self._writer is not None:
            self._writer.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def feature_names(layer: str, width: int, members: int = 1) -> list[str]:
    """The feature columns: ``hidden_000``...; an ensemble's members side by side, ``hidden_m0_000``...,
    ``hidden_m1_000``... (member k: the k-th checkpoint of the ensemble)."""
    digits = len(str(width - 1))
    if members == 1:
        return [f"{layer}_{j:0{digits}d}" for j in range(width)]
    return [f"{layer}_m{k}_{j:0{digits}d}" for k in range(members) for j in range(width)]


def _rows(store, chunk, log_probs, feats, kind: str, layer: str, members: int = 1) -> pd.DataFrame:
    meta = image_metadata(store, chunk)
    if kind == "embeddings":
        cols = dict(zip(feature_names(layer, feats.shape[1] // members, members), feats.T))
    else:
        probs = np.exp(log_probs)
        meta[P.PREDICTED] = np.asarray(store.class_names, dtype=object)[log_probs.argmax(-1)].astype(str)
        meta["Metadata_Predicted_Label"] = log_probs.argmax(-1).astype(np.int64)
        cols = {f"{P.PROB_PREFIX}{name}": probs[:, j] for j, name in enumerate(store.class_names)}
    return pd.concat([meta, pd.DataFrame(cols)], axis=1)


def write_image_table(
    model,
    params,
    store,
    indices,
    out,
    kind: str = "embeddings",
    layer: str = "hidden",
    batch: int = EVAL_BATCH,
    log=None,
) -> dict:
    """Writes one row per image of ``indices``: features (``kind="embeddings"``) or the predicted class and
    class probabilities (``kind="predictions"``), streaming batch by batch; returns rows, seconds, images/s.
    ``params`` may be an ensemble (a list of parameter trees): its probabilities are the mean of the members',
    its features the members' side by side (``feature_names``)."""
    if kind not in ("embeddings", "predictions"):
        raise ValueError(f"kind must be 'embeddings' or 'predictions', got {kind!r}")
    writer = TableWriter(out)
    k = len(store.class_names)
    confusion, loss_sum, members = np.zeros((k, k), np.int64), 0.0, as_members(params)
    t0 = time.perf_counter()
    try:
        # closing: an error in the loop closes the generator, so its Reader's threads stop at once
        outputs = contextlib.closing(iter_outputs(model, members, store, indices, batch, layer))
        with outputs as batches:
            for chunk, log_probs, feats in batches:
                writer.write(_rows(store, chunk, log_probs, feats, kind, layer, len(members)))
                loss_sum += tally(confusion, np.asarray(store.labels)[chunk], log_probs)
                if log:
                    log(f"{writer.rows}/{len(indices)} images")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    dt = time.perf_counter() - t0
    return dict(
        rows=writer.rows,
        seconds=dt,
        images_per_s=writer.rows / max(dt, 1e-9),
        path=str(out),
        confusion=confusion,
        loss=loss_sum / max(writer.rows, 1),
    )


# --- a run's predictions ----------------------------------------------------------------------------------
def evaluate_to_table(
    workdir, checkpoint="best", store: str = "", split: str = "val", batch: int = EVAL_BATCH, out="predictions.csv"
) -> dict:
    """``mcnn-eval --predictions``: writes the predictions table of a checkpoint and returns what
    ``evaluate.evaluate_checkpoint`` returns (loss, accuracy, per-class accuracy, confusion) plus
    ``treatment_summary`` (``profiling.prediction_summary``; None when the store records no compounds) and its
    ``treatment_accuracy`` and number of ``treatments``."""
    run = open_run(workdir, checkpoint, store, split)
    res = write_image_table(run.model, run.members, run.store, run.indices, out, "predictions", batch=batch)
    table = P.read_table(out)
    summary = P.prediction_summary(table, source=str(out)) if P.COMPOUND in table.columns else None
    return dict(
        confusion_summary(res["confusion"]),
        loss=res["loss"],
        step=run.steps[-1],
        members=run.steps,
        store=str(run.store.path),
        class_names=list(run.store.class_names),
        treatment_summary=summary,
        predictions=str(out),
        treatment_accuracy=summary and summary["treatment_accuracy"],
        treatments=summary and summary["treatments"],
    )


def format_treatment_summary(summary) -> str:
    """The treatment-level and per-compound accuracy of ``evaluate_to_table``'s result, as text."""
    if summary is None:
        return (
            f"no treatment-level accuracy: the store records no compounds ({P.COMPOUND} is missing; a "
            f"folder import has none)"
        )
    acc = "n/a" if summary["treatment_accuracy"] is None else f"{summary['treatment_accuracy']:.4f}"
    lines = [
        f"treatment-level accuracy {acc} over {summary['treatments']} treatments (mean class probabilities "
        f"per compound x concentration; control left out)",
        "per compound:",
    ]
    for r in summary["per_compound"].itertuples(index=False):
        lines.append(
            f"  {r[0]:<28s} {r[1]:<24s} {r.images:>5d} images  image acc {r.image_accuracy:.4f}  "
            f"{r.treatments} treatments  treatment acc {r.treatment_accuracy:.4f}"
        )
    return "\n".join(lines)
