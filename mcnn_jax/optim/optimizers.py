"""Optimizers for large-batch training, built from optax transformations (learning rates: ``schedules``).

- ``lars``: optax.lars with biases and normalisation parameters excluded from weight decay and the trust ratio.
- ``nesterov``: SGD with Nesterov momentum and L2 weight decay on the kernels (the published recipe).
- ``momentum``: SGD with heavy-ball momentum and L2 weight decay on the kernels (``momentum=0``: plain SGD).
- ``sgd`` is the name earlier versions used; it is read as what it ran (``nesterov`` when ``optim.nesterov`` is
  true, as it was by default, else ``momentum``), with a warning, so old work directories still resume and
  evaluate.
- ``adamw``: AdamW (decoupled weight decay on the kernels), for comparison.
- ``lamb``: LAMB (You et al. 2019, "Large batch optimization for deep learning"): Adam's direction plus decoupled
  weight decay, rescaled per layer to ``||w||`` (the trust ratio), so that a step changes every kernel by the
  learning rate relative to its norm; biases and normalisation parameters take Adam's step without the trust
  ratio or weight decay, as in LARS.

"""

from __future__ import annotations

import jax
import optax
from absl import logging


def decay_mask(params):
    """True for the weights that take weight decay and LARS trust ratios: kernels (ndim > 1).

    Biases and normalisation scales / offsets (ndim <= 1) are left alone.
    """
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer named by ``cfg.name`` with the learning-rate ``schedule`` (after global-norm clipping to
    ``cfg.grad_clip`` when it is positive)."""
    tx = _base_optimizer(cfg, schedule)
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx


NAMES = ("lars", "nesterov", "momentum", "adamw", "lamb")


def optimizer_name(cfg) -> str:
    """``cfg.name``, with the old name ``sgd`` read as what it ran: ``nesterov`` or ``momentum``."""
    if cfg.name != "sgd":
        return cfg.name
    name = "nesterov" if cfg.nesterov else "momentum"
    logging.warning(
        f"optim.name='sgd' is the old name of the SGD optimizers; it ran (and runs) as "
        f"optim.name='{name}' (optim.nesterov={bool(cfg.nesterov)}): use that name"
    )
    return name


def _base_optimizer(cfg, schedule):
    name, wd = optimizer_name(cfg), cfg.weight_decay
    if name == "lars":
        return optax.lars(
            schedule,
            weight_decay=wd,
            weight_decay_mask=decay_mask,
            trust_coefficient=cfg.trust_coefficient,
            eps=cfg.eps,
            trust_ratio_mask=decay_mask,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
        )
    if name in ("nesterov", "momentum"):
        return optax.chain(
            optax.add_decayed_weights(wd, mask=decay_mask),
            optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=name == "nesterov"),
        )
    if name == "adamw":
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask)
    if name == "lamb":  # optax.lamb applies the trust ratio to every parameter; this one masks it like LARS
        return optax.chain(
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(wd, mask=decay_mask),
            optax.masked(optax.scale_by_trust_ratio(), decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    raise ValueError(f"optim.name must be one of {', '.join(NAMES)}; got {name!r}")


def smoothed_targets(labels, num_classes: int, label_smoothing: float = 0.0):
    """One-hot targets of integer labels, with label smoothing."""
    onehot = jax.nn.one_hot(labels, num_classes)
    return optax.smooth_labels(onehot, label_smoothing) if label_smoothing else onehot
