"""A global batch that grows during training (``train.batch_schedule``).

The gradient noise scale (``optim.noise_scale``; ``benchmarks/measure_noise_scale.py``) grows as training proceeds:
early on a batch far above it wastes images, later the same batch keeps its accuracy. ``train.batch_schedule = ((0, 16),
(10, 64), (20, 256))`` trains epochs 0-10 at a global batch of 16, epochs 10-20 at 64 and the rest at 256 (Smith et al.
2018, "Don't decay the learning rate, increase the batch size"; Devarakonda et al. 2017, "AdaBatch"). Each entry is (the
whole epoch the phase starts at, its global batch); the first starts at epoch 0 and the last batch is
``train.global_batch``, the batch the run scales to.

Durations stay in epochs: warmup, decay, evaluations and the collapsed ensemble's cycles happen at the same epochs
as at a constant batch. The learning rate at every step is the one the run at ``train.global_batch`` would have
at that epoch, scaled to the phase's batch by ``optim.lr_scaling`` (by the linear rule: times batch /
global_batch), so every phase follows the learning-rate rule of its own batch.

``BatchSchedule`` maps steps to phases, epochs and the training reader's steps: phase ``i`` reads epoch ``e`` of
its own reader (``Reader`` at that batch) as a run at that batch would, so the order of the images in an epoch
depends only on the seed, the epoch and the batch. Resuming needs nothing but the state's step.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mcnn_jax import optim

KEY = "train.batch_schedule"


@dataclasses.dataclass(frozen=True)
class Phase:
    start_epoch: int
    global_batch: int
    steps_per_epoch: int
    start_step: int  # steps taken before the phase


@dataclasses.dataclass(frozen=True)
class BatchSchedule:
    phases: tuple  # Phase, by start

    @property
    def constant(self) -> bool:
        return len(self.phases) == 1

    @property
    def final_batch(self) -> int:
        return self.phases[-1].global_batch

    def index(self, step: int) -> int:
        """The phase of the step taken after ``step`` steps."""
        return sum(step >= p.start_step for p in self.phases[1:])

    def phase(self, step: int) -> Phase:
        return self.phases[self.index(step)]

    def epoch(self, step: int) -> float:
        """Epochs trained after ``step`` steps."""
        p = self.phase(step)
        return p.start_epoch + (step - p.start_step) / p.steps_per_epoch

    def steps(self, epoch: float) -> float:
        """Steps that train ``epoch`` epochs (fractional; the inverse of ``epoch``)."""
        p = [q for q in self.phases if q.start_epoch <= epoch][-1]
        return p.start_step + (epoch - p.start_epoch) * p.steps_per_epoch

    def reader_step(self, step: int) -> int:
        """The step of the phase's training reader (at the phase's batch) that the run's ``step`` reads."""
        p = self.phase(step)
        return p.start_epoch * p.steps_per_epoch + step - p.start_step

    @property
    def shift(self) -> int:
        """Steps of the last phase's step k = steps of a run at its batch throughout, plus ``shift``: the main run
        ends and the cycles run in the last phase (``schedule_from_config`` checks), so its steps are the constant
        run's."""
        last = self.phases[-1]
        return last.start_step - last.start_epoch * last.steps_per_epoch

    def total_steps(self, cfg) -> int:
        """All training steps of ``cfg`` (the ``optim`` section): its main epochs and cycles."""
        return optim.total_steps(cfg, self.phases[-1].steps_per_epoch) + self.shift

    def snapshot_steps(self, cfg) -> list[int]:
        """The collapsed ensemble's snapshot steps: ``optim.snapshot_steps`` at the last batch, shifted."""
        return [s + self.shift for s in optim.snapshot_steps(cfg, self.phases[-1].steps_per_epoch)]

    def eval_steps(self, every_epochs: float, total: int) -> set[int]:
        """The steps after which the run evaluates: every ``every_epochs`` epochs (every step if it is 0) and at
        the end."""
        if self.constant or every_epochs <= 0:
            every = max(1, round(every_epochs * self.phases[0].steps_per_epoch))
            return set(range(every, total + 1, every)) | {total}
        out, k = {total}, 1
        while (s := round(self.steps(k * every_epochs))) < total:
            out.add(max(1, s))
            k += 1
        return out

    def lr_schedule(self, cfg):
        """The learning-rate schedule (an optax schedule of the step) of ``cfg`` (the ``optim`` section): at a
        constant batch ``optim.make_schedule``'s; else the final batch's schedule at each step's epoch, scaled to
        the phase's batch by ``optim.lr_scaling``."""
        last = self.phases[-1]
        final = optim.make_schedule(cfg, last.steps_per_epoch, last.global_batch)
        if self.constant:
            return final
        rule = cfg.lr_scaling
        starts = jnp.asarray([p.start_step for p in self.phases[1:]], jnp.int32)
        # step k of phase i is its reader's step k + offset (whole numbers): epoch (k + offset) / spe_i, i.e. the
        # final batch's step (k + offset) x spe_last / spe_i, computed as a quotient and remainder of integers so
        # that whole steps (the last phase; epoch boundaries) come out exact and a boundary such as the end of the
        # warmup, a step decay or a cycle is crossed at the same step as at a constant batch
        offset = jnp.asarray([p.start_epoch * p.steps_per_epoch - p.start_step for p in self.phases], jnp.int32)
        spe = jnp.asarray([p.steps_per_epoch for p in self.phases], jnp.int32)
        factor = jnp.asarray(
            [optim.scaled_lr(1.0, p.global_batch, last.global_batch, rule) for p in self.phases], jnp.float32
        )

        def schedule(count):
            count = jnp.asarray(count, jnp.int32)
            i = jnp.sum(count >= starts)
            q, r = jnp.divmod((count + offset[i]) * last.steps_per_epoch, spe[i])
            return final(q.astype(jnp.float32) + r.astype(jnp.float32) / spe[i].astype(jnp.float32)) * factor[i]

        return schedule

    def describe(self) -> str:
        if self.constant:
            p = self.phases[0]
            return f"{p.steps_per_epoch} steps/epoch"
        return "global batch " + ", ".join(
            f"{p.global_batch} from epoch {p.start_epoch} (step {p.start_step}, {p.steps_per_epoch} steps/epoch)"
            for p in self.phases
        )


def parse(spec, global_batch: int, main_epochs: float | None = None) -> list[tuple[int, int]]:
    """``train.batch_schedule`` as (start epoch, global batch) pairs, checked; ``()`` is ``global_batch`` alone.
    ``main_epochs`` (``optim.epochs``): the last phase must start before it, since the main run ends,
    and any cycles run, in the last phase."""
    if not spec:
        return [(0, int(global_batch))]
    pairs = []
    for item in spec:
        if (
            not isinstance(item, (tuple, list))
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        ):
            raise ValueError(
                f"{KEY} entries are (start epoch, global batch) pairs of whole numbers, e.g. "
                f"((0, 16), (10, 64), (20, 256)); got {item!r} in {tuple(spec)!r}"
            )
        pairs.append((int(item[0]), int(item[1])))
    epochs = [e for e, _ in pairs]
    if epochs[0] != 0:
        raise ValueError(f"{KEY} must start at epoch 0; its first entry is {pairs[0]}")
    if any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise ValueError(f"{KEY}'s start epochs must increase; got {epochs}")
    if any(b < 1 for _, b in pairs):
        raise ValueError(f"{KEY}'s global batches must be positive; got {[b for _, b in pairs]}")
    if pairs[-1][1] != global_batch:
        raise ValueError(
            f"{KEY} ends at a global batch of {pairs[-1][1]} but train.global_batch is {global_batch}: "
            f"set train.global_batch={pairs[-1][1]}, the batch the run scales to"
        )
    if main_epochs is not None and len(pairs) > 1 and pairs[-1][0] >= main_epochs:
        raise ValueError(
            f"{KEY} has a phase starting at epoch {pairs[-1][0]}, but the main run ends at epoch "
            f"{main_epochs:g} (optim.epochs; any optim.cycles follow it in the last phase): a last phase "
            f"not before the last epoch never runs as planned; start it earlier"
        )
    return pairs


def schedule_from_config(config, num_train: int) -> BatchSchedule:
    """The run's batch schedule: ``config.train.batch_schedule`` (or the constant ``train.global_batch``) over
    ``num_train`` training images. The last phase must start before ``optim.epochs`` (the main run ends, and any
    cycles run, in it); a batch larger than the training set is an error naming the key."""
    pairs = parse(config.train.batch_schedule, config.train.global_batch, config.optim.epochs)
    phases, step = [], 0
    for i, (epoch, batch) in enumerate(pairs):
        try:
            spe = optim.steps_per_epoch(num_train, batch)
        except ValueError as e:
            if len(pairs) == 1:
                raise
            raise ValueError(f"{KEY}: {e}") from None
        phases.append(Phase(epoch, batch, spe, step))
        if i + 1 < len(pairs):
            step += (pairs[i + 1][0] - epoch) * spe
    return BatchSchedule(tuple(phases))
