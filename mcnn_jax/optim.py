"""Optimizers and learning-rate schedules for large-batch training, built from optax transformations.

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

Durations are given in epochs and converted to steps from the dataset size and the global batch; the peak
learning rate follows ``optim.lr_scaling``: the linear scaling rule ``lr = base_lr * global_batch / base_batch``
(the default; Goyal et al. 2017), the square-root rule (``sqrt``: ``base_lr * sqrt(global_batch / base_batch)``,
the usual rule for Adam-type optimizers, whose steps do not grow with the gradient's signal-to-noise ratio) or
``none`` (``base_lr`` at any batch).
"""

from __future__ import annotations

import math

import jax
import optax
from absl import logging


def decay_mask(params):
    """True for the weights that take weight decay and LARS trust ratios: kernels (ndim > 1).

    Biases and normalisation scales / offsets (ndim <= 1) are left alone.
    """
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


SCALINGS = ("linear", "sqrt", "none")


def scaled_lr(base_lr: float, global_batch: int, base_batch: int, rule: str = "linear") -> float:
    """The learning rate at ``global_batch`` of ``base_lr`` at ``base_batch`` by ``rule`` (``optim.lr_scaling``):
    ``linear`` (Goyal et al. 2017), ``sqrt`` or ``none``."""
    if global_batch <= 0 or base_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got global_batch={global_batch}, base_batch={base_batch}")
    if rule not in SCALINGS:
        raise ValueError(f"optim.lr_scaling must be one of {', '.join(SCALINGS)}; got {rule!r}")
    ratio = global_batch / base_batch
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def steps_per_epoch(num_train: int, global_batch: int) -> int:
    """Training steps per epoch: every step takes a full global batch (the remainder is dropped)."""
    if num_train < global_batch:
        raise ValueError(f"the training set has {num_train} images, fewer than one global batch of {global_batch}")
    return num_train // global_batch


def make_schedule(cfg, steps_per_epoch: int, global_batch: int) -> optax.Schedule:
    """Linear warmup from ``warmup_init_lr`` to the scaled peak, then ``decay`` down to ``end_lr`` over ``epochs``;
    then, with ``cycles`` > 0, the collapsed ensemble's cycles (``cyclic_schedule``).

    ``cfg`` holds: base_lr, base_batch, warmup_epochs, warmup_init_lr, decay ('linear' | 'cosine' |
    'polynomial' | 'step' | 'constant'), end_lr, power, step_epochs, step_gamma, the total ``epochs``, and
    cycles, cycle_epochs, cycle_base_lr.
    """
    peak = scaled_lr(cfg.base_lr, global_batch, cfg.base_batch, cfg.get("lr_scaling", "linear"))
    total = main_steps(cfg, steps_per_epoch)
    warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    decay = _decay(cfg, peak, max(1, total - warmup), warmup, steps_per_epoch)
    main = decay if warmup == 0 else optax.join_schedules(
        [optax.linear_schedule(cfg.warmup_init_lr, peak, warmup), decay], [warmup])
    return cyclic_schedule(cfg, main, steps_per_epoch, global_batch)


def _decay(cfg, peak: float, rest: int, warmup: int, steps_per_epoch: int) -> optax.Schedule:
    if cfg.decay == "linear":
        return optax.linear_schedule(peak, cfg.end_lr, rest)
    if cfg.decay == "cosine":
        return optax.cosine_decay_schedule(peak, rest, alpha=cfg.end_lr / peak if peak else 0.0)
    if cfg.decay == "polynomial":
        return optax.polynomial_schedule(peak, cfg.end_lr, cfg.power, rest)
    if cfg.decay == "step":
        bounds = {max(0, int(round(e * steps_per_epoch)) - warmup): cfg.step_gamma for e in cfg.step_epochs}
        return optax.piecewise_constant_schedule(peak, bounds)
    if cfg.decay == "constant":
        return optax.constant_schedule(peak)
    raise ValueError(f"optim.decay must be linear, cosine, polynomial, step or constant; got {cfg.decay!r}")


# --- the collapsed ensemble (Codreanu et al., "Scale out for large minibatch SGD") -----------------------------
def main_steps(cfg, steps_per_epoch: int) -> int:
    """The steps of the main run (warmup + decay over ``epochs``), before any cycle."""
    return max(1, int(round(cfg.epochs * steps_per_epoch)))


def cycle_steps(cfg, steps_per_epoch: int) -> int:
    return max(1, int(round(cfg.get("cycle_epochs", 0.0) * steps_per_epoch)))


def snapshot_steps(cfg, steps_per_epoch: int) -> list[int]:
    """The steps whose checkpoints are the collapsed ensemble's members (kept whatever ``keep_checkpoints``):
    the end of the main run and the end of each of the ``cycles`` cycles; none without cycles."""
    cycles = cfg.get("cycles", 0)
    if cycles <= 0:
        return []
    main, cycle = main_steps(cfg, steps_per_epoch), cycle_steps(cfg, steps_per_epoch)
    return [main + i * cycle for i in range(cycles + 1)]


def total_steps(cfg, steps_per_epoch: int) -> int:
    """All training steps: the main run's ``epochs`` (rounded up) and the cycles after it."""
    snapshots = snapshot_steps(cfg, steps_per_epoch)
    return snapshots[-1] if snapshots else math.ceil(cfg.epochs * steps_per_epoch)


def cyclic_schedule(cfg, main: optax.Schedule, steps_per_epoch: int, global_batch: int) -> optax.Schedule:
    """``main`` for the main run, then ``cycles`` cosine-restart cycles of ``cycle_epochs`` each: every cycle
    restarts at ``cycle_base_lr`` (at ``base_batch``, scaled like ``base_lr``) and decays along a cosine
    to ``end_lr``; its last step is a snapshot (``snapshot_steps``). ``main`` alone without cycles."""
    cycles = cfg.get("cycles", 0)
    if cycles <= 0:
        return main
    peak = scaled_lr(cfg.cycle_base_lr, global_batch, cfg.base_batch, cfg.get("lr_scaling", "linear"))
    if peak <= 0:
        raise ValueError(f"optim.cycle_base_lr must be positive with optim.cycles={cycles}; got {cfg.cycle_base_lr}")
    # a cycle's first step is taken at the restart peak and its last one, which ends at the snapshot, at end_lr
    cycle = optax.cosine_decay_schedule(peak, max(1, cycle_steps(cfg, steps_per_epoch) - 1), alpha=cfg.end_lr / peak)
    return optax.join_schedules([main] + [cycle] * cycles, snapshot_steps(cfg, steps_per_epoch)[:-1])


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer named by ``cfg.name`` with the learning-rate ``schedule`` (after global-norm clipping to
    ``cfg.grad_clip`` when it is positive)."""
    tx = _base_optimizer(cfg, schedule)
    if cfg.get("grad_clip", 0.0) > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx


NAMES = ("lars", "nesterov", "momentum", "adamw", "lamb")


def optimizer_name(cfg) -> str:
    """``cfg.name``, with the old name ``sgd`` read as what it ran: ``nesterov`` or ``momentum``."""
    if cfg.name != "sgd":
        return cfg.name
    name = "nesterov" if cfg.get("nesterov", True) else "momentum"
    logging.warning(f"optim.name='sgd' is the old name of the SGD optimizers; it ran (and runs) as "
                    f"optim.name='{name}' (optim.nesterov={bool(cfg.get('nesterov', True))}): use that name")
    return name


def _base_optimizer(cfg, schedule):
    name, wd = optimizer_name(cfg), cfg.weight_decay
    if name == "lars":
        return optax.lars(schedule, weight_decay=wd, weight_decay_mask=decay_mask,
                          trust_coefficient=cfg.trust_coefficient, eps=cfg.eps,
                          trust_ratio_mask=decay_mask, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if name in ("nesterov", "momentum"):
        return optax.chain(
            optax.add_decayed_weights(wd, mask=decay_mask),
            optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=name == "nesterov"))
    if name == "adamw":
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask)
    if name == "lamb":  # optax.lamb applies the trust ratio to every parameter; this one masks it like LARS
        return optax.chain(
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(wd, mask=decay_mask),
            optax.masked(optax.scale_by_trust_ratio(), decay_mask),
            optax.scale_by_learning_rate(schedule))
    raise ValueError(f"optim.name must be one of {', '.join(NAMES)}; got {name!r}")


def smoothed_targets(labels, num_classes: int, label_smoothing: float = 0.0):
    """One-hot targets of integer labels, with label smoothing."""
    onehot = jax.nn.one_hot(labels, num_classes)
    return optax.smooth_labels(onehot, label_smoothing) if label_smoothing else onehot


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy against integer labels, with label smoothing."""
    return optax.softmax_cross_entropy(logits, smoothed_targets(labels, num_classes, label_smoothing)).mean()
