"""Opening a trained run: its model, the parameters of one checkpoint or of an ensemble, the checkpoints'
metadata, its config (merged onto today's defaults) and its store. Every reader of a finished run (``mcnn-eval``,
``mcnn-embed``, ``mcnn-loco``, the benchmarks and notebooks) goes through here.

    from mcnn_jax.evaluation.run import load_model, open_run
    model, params, meta = load_model("runs/default", checkpoint="best")
    logits = model.apply({"params": params}, images)  # images: float32 [N, H, W, C] in [0, 1]

    run = open_run("runs/default", "snapshots", split="val")   # run.model, run.members, run.store, run.indices

``checkpoint``: ``best``, ``latest``, a step number, ``snapshots`` (the collapsed ensemble's, ``optim.cycles >
0``) or a comma-separated list of these (an ensemble).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np

from mcnn_jax.checkpoint import Checkpointer
from mcnn_jax.config import restore_config
from mcnn_jax.data import open_store, split_indices
from mcnn_jax.data.prepare import store_path
from mcnn_jax.data.store import Store
from mcnn_jax.model.mcnn import MCNN, from_config, init_params
from mcnn_jax.optim import make_optimizer, make_schedule
from mcnn_jax.step import create_state

SPLITS = ("all", "train", "val")
EVAL_BATCH = 8  # images per forward pass when evaluating or embedding a run (every command's --batch default)


@dataclasses.dataclass
class TrainedRun:
    """A trained run opened for evaluation: ``members`` holds one parameter tree per checkpoint (one for a
    single checkpoint), ``metas`` their metadata; ``indices`` the images of ``split`` in ``store``."""

    model: MCNN
    members: list
    metas: list[dict]
    config: ml_collections.ConfigDict
    store: Store
    indices: np.ndarray

    @property
    def steps(self) -> list[int]:
        return [m["step"] for m in self.metas]


def as_members(params) -> list:
    """A list of parameter trees: ``params`` itself if it is a list or tuple (an ensemble), else ``[params]``."""
    return list(params) if isinstance(params, (list, tuple)) else [params]


def load_ensemble(workdir, checkpoints: str | int = "snapshots"):
    """(model, [params], [meta]) of the checkpoints in ``workdir`` that ``checkpoints`` names (see the module
    docstring); every ``meta["config"]`` is the run's config merged onto today's defaults (``restore_config``)."""
    ckpt = Checkpointer(workdir, write=False)
    try:
        if not ckpt.steps():
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
        steps = ckpt.resolve_members(str(checkpoints))
        first = ckpt.meta(steps[0])
        config = restore_config(first["config"])
        model = from_config(config.model, num_classes=first["num_classes"])
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
    metas = [dict(meta, config=restore_config(meta["config"])) for _, meta in restored]
    return model, [state.params for state, _ in restored], metas


def load_model(workdir, checkpoint: str | int = "best"):
    """(model, params, meta) of one checkpoint in ``workdir``: ``best``, ``latest`` or a step number."""
    model, members, metas = load_ensemble(workdir, checkpoint)
    if len(members) != 1:
        raise ValueError(f"{checkpoint!r} names {len(members)} checkpoints; load_ensemble loads an ensemble")
    return model, members[0], metas[0]


def open_run(workdir, checkpoint: str | int = "best", store: str | Path = "", split: str = "all") -> TrainedRun:
    """The run in ``workdir`` at ``checkpoint`` on its own store (or ``store``), with the images of ``split``
    (``all``, or the run's ``train`` / ``val`` split). The store must have the model's classes and image shape."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    model, members, metas = load_ensemble(workdir, checkpoint)
    meta, config = metas[-1], metas[-1]["config"]
    path = Path(store) if store else store_path(config, workdir)
    st = open_store(path)
    if list(st.class_names) != list(meta["class_names"]):
        raise ValueError(
            f"the store {path} has classes {st.class_names}, the model was trained on {meta['class_names']}"
        )
    if tuple(st.image_shape) != tuple(config.model.input_shape):
        raise ValueError(
            f"the store {path} holds {st.image_shape} images, the model takes {tuple(config.model.input_shape)}"
        )
    if split == "all":
        idx = np.arange(st.num_images)
    else:
        idx = split_indices(st, config.data)[0 if split == "train" else 1]
    return TrainedRun(model, members, metas, config, st, idx)
