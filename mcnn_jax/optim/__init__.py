"""Optimisation: optimizers (``optimizers``), learning-rate schedules and step counts (``schedules``), a
global batch that grows during training (``batch_schedule``) and the gradient noise scale (``noise_scale``).

The optimizers' and schedules' functions are re-exported here (``from mcnn_jax import optim;
optim.make_schedule(...)``), as optax does."""

from mcnn_jax.optim.optimizers import NAMES, decay_mask, make_optimizer, optimizer_name, smoothed_targets
from mcnn_jax.optim.schedules import (
    SCALINGS,
    cycle_steps,
    cyclic_schedule,
    main_steps,
    make_schedule,
    scaled_lr,
    snapshot_steps,
    steps_per_epoch,
    total_steps,
)

__all__ = [
    "NAMES",
    "SCALINGS",
    "cycle_steps",
    "cyclic_schedule",
    "decay_mask",
    "main_steps",
    "make_optimizer",
    "make_schedule",
    "optimizer_name",
    "scaled_lr",
    "smoothed_targets",
    "snapshot_steps",
    "steps_per_epoch",
    "total_steps",
]
