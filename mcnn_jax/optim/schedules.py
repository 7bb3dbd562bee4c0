"""Learning-rate schedules and step counts: warmup, decay, the collapsed ensemble's cosine-restart cycles.

Durations are given in epochs and converted to steps from the dataset size and the global batch; the peak
learning rate follows ``optim.lr_scaling``: the linear scaling rule ``lr = base_lr * global_batch / base_batch``
(the default; Goyal et al. 2017), the square-root rule (``sqrt``: ``base_lr * sqrt(global_batch / base_batch)``,
the usual rule for Adam-type optimizers, whose steps do not grow with the gradient's signal-to-noise ratio) or
``none`` (``base_lr`` at any batch).
"""

from __future__ import annotations

import math

import optax

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
    peak = scaled_lr(cfg.base_lr, global_batch, cfg.base_batch, cfg.lr_scaling)
    total = main_steps(cfg, steps_per_epoch)
    warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    decay = _decay(cfg, peak, max(1, total - warmup), warmup, steps_per_epoch)
    main = (
        decay
        if warmup == 0
        else optax.join_schedules([optax.linear_schedule(cfg.warmup_init_lr, peak, warmup), decay], [warmup])
    )
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
    return max(1, int(round(cfg.cycle_epochs * steps_per_epoch)))


def snapshot_steps(cfg, steps_per_epoch: int) -> list[int]:
    """The steps whose checkpoints are the collapsed ensemble's members (kept whatever ``keep_checkpoints``):
    the end of the main run and the end of each of the ``cycles`` cycles; none without cycles."""
    cycles = cfg.cycles
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
    cycles = cfg.cycles
    if cycles <= 0:
        return main
    peak = scaled_lr(cfg.cycle_base_lr, global_batch, cfg.base_batch, cfg.lr_scaling)
    if peak <= 0:
        raise ValueError(f"optim.cycle_base_lr must be positive with optim.cycles={cycles}; got {cfg.cycle_base_lr}")
    # a cycle's first step is taken at the restart peak and its last one, which ends at the snapshot, at end_lr
    cycle = optax.cosine_decay_schedule(peak, max(1, cycle_steps(cfg, steps_per_epoch) - 1), alpha=cfg.end_lr / peak)
    return optax.join_schedules([main] + [cycle] * cycles, snapshot_steps(cfg, steps_per_epoch)[:-1])
