"""Orbax checkpoints in ``<workdir>/checkpoints``: the last N kept plus the best by validation accuracy (and the
collapsed ensemble's snapshots, whose metadata says ``snapshot: true``).

Each checkpoint holds the train state (params, optimizer state, step, RNG) and a JSON item with the data
order's position (the global step: the reader's order depends only on it and the seed), the validation
metrics if the step was evaluated, and the config. Orbax writes a step into a temporary folder and renames it
when complete, so a half-written checkpoint is never listed, and never restored.

Rank 0 owns the checkpoints (``rank_checkpointer``): it holds the ``Checkpointer``, the other ranks a
``NullCheckpointer`` (under MPI without ``jax.distributed`` every rank would believe it is Orbax's primary
process). Rank 0 also reads, and broadcasts the state to the other ranks, so only rank 0 needs the checkpoints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from mcnn_jax.step import CHECKPOINTED


def _checkpointed(state) -> dict:
    """The fields of a ``TrainState`` a checkpoint holds (``step.CHECKPOINTED``): not the exchange's per-rank
    state (PowerSGD's error feedback differs between ranks; a resume starts it afresh)."""
    return {k: getattr(state, k) for k in CHECKPOINTED}


def _manager(directory: Path, keep: int = 3, read_only: bool = False, keep_steps=()):
    policies = [
        cm.LatestN(n=max(1, keep)),
        cm.BestN(get_metric_fn=lambda m: m["val_accuracy"], n=1, keep_checkpoints_without_metrics=False),
    ]
    if keep_steps:  # the collapsed ensemble's snapshots
        policies.append(cm.CustomSteps(steps=list(keep_steps)))
    policy = cm.AnyPreservationPolicy(policies)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only,
        save_interval_steps=0 if read_only else 1,
    )  # read-only: what Orbax would set, with a warning
    if not read_only:
        return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
    # Orbax warns that a read-only manager's directory is read only, which is what was asked for: that notice
    # alone is dropped, so that evaluating a finished run (mcnn-eval, mcnn-embed, mcnn-loco) is quiet
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_READ_ONLY_NOTICE)
    try:
        return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
    finally:
        absl_logger.removeFilter(_READ_ONLY_NOTICE)


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


_READ_ONLY_NOTICE = _DropReadOnlyNotice()


class Checkpointer:
    """Writes and finds the checkpoints of one work directory (``write=False``: only reads). ``keep_steps``
    (the collapsed ensemble's snapshot steps) are kept besides the latest ``keep`` and the best."""

    def __init__(self, workdir, keep: int = 3, write: bool = True, keep_steps=()):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.write = write
        if not write and not self.directory.is_dir():
            self._mngr = None
        else:
            self._mngr = _manager(self.directory, keep, read_only=not write, keep_steps=keep_steps)

    # --- writing --------------------------------------------------------------------------------------------
    def save(self, state, meta: dict, val_accuracy: float | None = None, wait: bool = False):
        """Starts an (asynchronous) save of ``state`` at its step; ``wait`` blocks until it is on disk."""
        if not self.write:
            return
        step = int(jax.device_get(state.step))
        if step in self._mngr.all_steps():
            return
        metrics = None if val_accuracy is None else {"val_accuracy": float(val_accuracy)}
        meta = dict(meta, step=step, val_accuracy=val_accuracy)
        self._mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_checkpointed(state)), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
        )
        if wait:
            self._mngr.wait_until_finished()

    def wait(self):
        if self._mngr is not None:
            self._mngr.wait_until_finished()

    def close(self):
        if self._mngr is not None:
            self._mngr.wait_until_finished()
            self._mngr.close()

    # --- reading --------------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        if self._mngr is None:
            return []
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def meta(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def resolve(self, which: str | int = "latest") -> int | None:
        """The step of ``latest``, ``best`` (highest validation accuracy) or a step number; None if none."""
        steps = self.steps()
        if not steps:
            return None
        if which == "latest":
            return steps[-1]
        if which == "best":
            scored = [
                (m.get("val_accuracy"), s) for s in steps for m in [self.meta(s)] if m.get("val_accuracy") is not None
            ]
            if not scored:
                raise FileNotFoundError(f"no evaluated checkpoint in {self.directory}; kept steps: {steps}")
            return max(scored)[1]
        step = int(which)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; kept steps: {steps}")
        return step

    def resolve_members(self, which: str) -> list[int]:
        """The steps of an ensemble: ``snapshots`` (the collapsed ensemble's snapshots, in step order) or a
        comma-separated list of ``best``, ``latest`` and step numbers."""
        if which == "snapshots":
            steps = [s for s in self.steps() if self.meta(s).get("snapshot")]
            if not steps:
                raise FileNotFoundError(
                    f"no snapshot checkpoint in {self.directory} (train with optim.cycles > 0); "
                    f"kept steps: {self.steps()}"
                )
            return steps
        steps = [self.resolve(w.strip()) for w in str(which).split(",") if w.strip()]
        if not steps or None in steps:
            raise FileNotFoundError(f"no checkpoint {which!r} in {self.directory}")
        return steps

    def restore(self, step: int, abstract_state):
        """(state, meta) of ``step``, with the structure, shapes and dtypes of ``abstract_state``."""
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _checkpointed(abstract_state))
        out = self._mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return abstract_state.replace(**out["state"]), out["meta"]


class NullCheckpointer:
    """What MPI ranks other than 0 hold: saving does nothing, no step is ever found, and ``restore`` returns the
    state it was given (rank 0's restored state then reaches every rank by broadcast)."""

    def __init__(self, workdir):
        self.directory = Path(workdir).absolute() / "checkpoints"

    def save(self, state, meta: dict, val_accuracy: float | None = None, wait: bool = False):
        pass

    def wait(self):
        pass

    def close(self):
        pass

    def steps(self) -> list[int]:
        return []

    def resolve(self, which: str | int = "latest") -> None:
        return None

    def restore(self, step: int, abstract_state):
        return abstract_state, {}


def rank_checkpointer(workdir, world, keep: int = 3, keep_steps=()) -> Checkpointer | NullCheckpointer:
    """Rank 0 owns the checkpoints: a ``Checkpointer`` there, a ``NullCheckpointer`` on every other rank."""
    return Checkpointer(workdir, keep=keep, keep_steps=keep_steps) if world.is_primary else NullCheckpointer(workdir)


def config_to_json(config) -> str:
    return json.dumps(config.to_dict(), default=lambda o: list(o) if isinstance(o, tuple) else str(o))


def host_tree(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
