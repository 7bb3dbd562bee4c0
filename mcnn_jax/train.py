"""The training loop: data, model, optimizer and checkpoints from one config, on one or many MPI ranks.

``train_and_evaluate(config, workdir)`` resumes from the latest checkpoint in ``workdir`` if there is one, runs
the jitted train step over the reader's global batches, evaluates periodically, saves checkpoints, and
returns (and writes to ``<workdir>/summary.json``) a summary with the time to train to the target accuracy.

``setup`` builds everything a run needs (a ``Run``); ``train_and_evaluate`` is the loop over it. Store
preparation is in ``data/prepare.py``, evaluation in ``evaluate.py``, collectives in ``distributed.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from mcnn_jax import optim
from mcnn_jax.checkpoint import config_to_json, host_tree, rank_checkpointer
from mcnn_jax.data import Reader, split_indices
from mcnn_jax.data.prepare import prepare_store
from mcnn_jax.evaluation.evaluate import Evaluator
from mcnn_jax.metrics_log import MetricsLog, Progress
from mcnn_jax.model.flops import mcnn_flops
from mcnn_jax.model.mcnn import check_model, from_config, init_params
from mcnn_jax.optim import batch_schedule
from mcnn_jax.optim.batch_schedule import BatchSchedule
from mcnn_jax.parallel import exchange
from mcnn_jax.parallel.nonblocking import Exchanger
from mcnn_jax.parallel.world import World, init_world
from mcnn_jax.runtime import StopRequest, setup_logging
from mcnn_jax.step import create_state, make_train_step, num_microbatches


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint (if any) is kept."""


def itstime(step: int, every: int, total: int) -> bool:
    """True every ``every`` steps (never if ``every`` <= 0) and at the last step ``total``."""
    return (every > 0 and step % every == 0) or step == total


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]  # tracing + lowering + XLA compilation in this process, from JAX's monitoring events


def _on_duration(event: str, duration: float, **kwargs):
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


class Chrono:
    """Wall time and throughput. ``compile_s`` is the time JAX spent tracing, lowering and compiling during the
    training steps this process ran (JAX's own compile events: the first step's, and the first step of each later
    phase of ``train.batch_schedule``); ``images_per_s`` is the steady-state rate over the steps after the first
    that compiled nothing (data wait included), so neither compilation nor warm-up lowers it."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch  # the images of a step unless ``record`` says otherwise
        self.t_start = time.perf_counter()  # the wall clock of the run starts before the first step
        self.compile_s = 0.0
        self.first_step_s = None  # the first step's wait + step time, compilation included
        self.steps = 0
        self.wait_s = self.step_s = 0.0  # all steps
        self.steady_s = 0.0  # steps after the first that compiled nothing
        self.steady_images = 0
        self._compiled = _compile_seconds[0]

    def begin(self):
        """A step starts: compilation from now until ``record`` is the step's (an evaluation's is not)."""
        self._compiled = _compile_seconds[0]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def record(self, wait_s: float, step_s: float, images: int | None = None):
        """One step of ``images`` images (default ``global_batch``). A later step that compiled (a new phase of
        ``train.batch_schedule``) adds to ``compile_s`` and is left out of the steady state."""
        self.steps += 1
        self.wait_s += wait_s
        self.step_s += step_s
        compiled = _compile_seconds[0] - self._compiled
        if self.steps == 1:
            self.first_step_s = wait_s + step_s
            self._first_images, self._first_compile_s = images or self.global_batch, compiled
        self.compile_s += compiled
        if self.steps > 1 and compiled == 0:
            self.steady_s += wait_s + step_s
            self.steady_images += images or self.global_batch

    @property
    def images_per_s(self) -> float | None:
        if self.steady_images:
            return self.steady_images / max(self.steady_s, 1e-9)
        if self.steps:  # no steady step yet: the first one's time without the compilation
            return self._first_images / max(self.first_step_s - self._first_compile_s, 1e-9)
        return None

    def summary(self) -> dict:
        return dict(
            images_per_s=self.images_per_s,
            compile_s=self.compile_s,
            first_step_s=self.first_step_s,
            data_wait_fraction=self.wait_s / max(self.wait_s + self.step_s, 1e-9),
        )


class Profiler:
    """A ``jax.profiler`` trace of the steps ``first``..``last`` (1-based, inclusive, as in metrics.jsonl) into
    ``<workdir>/profile/rank<R>``, for TensorBoard's profile plugin or Perfetto. ``(0, 0)`` traces nothing."""

    def __init__(self, steps, workdir: Path, rank: int):
        self.first, self.last = (int(s) for s in steps)
        self.directory = Path(workdir) / "profile" / f"rank{rank}"
        self.active = False

    def before(self, step: int):
        if self.first > 0 and step == self.first and not self.active:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int):
        if self.active and step >= self.last:
            self.close()

    def close(self):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info(f"wrote the profile of steps {self.first}..{self.last} to {self.directory}")


@dataclasses.dataclass
class Run:
    """What ``setup`` builds: everything the loop reads or calls."""

    config: Any
    workdir: Path
    world: World
    store: Any
    batch_schedule: BatchSchedule  # the global batch (and steps per epoch) of every step
    start_step: int
    total_steps: int
    state: Any  # the initial state (donated to the first step: read start_step instead)
    train_steps: tuple  # per phase of the batch schedule: jitted (state, batch) -> (state, metrics)
    batches: Any  # iterator of (step, batch) from the training reader(s), from the state's step on
    evaluator: Evaluator
    ckpt: Any  # Checkpointer on rank 0, NullCheckpointer elsewhere
    log: MetricsLog
    progress: Progress
    profiler: Profiler
    train_flops: float  # training FLOPs per image (forward + backward)
    plans: tuple  # per phase: how the step exchanges its gradients (train.comm)
    eval_steps: frozenset  # the steps after which the run evaluates (train.eval_every_epochs and the last)
    snapshot_steps: tuple = ()  # the collapsed ensemble's snapshots: evaluated and kept

    def phase(self, step: int) -> int:
        """The batch schedule's phase of the ``step``-th step (1-based, as in metrics.jsonl)."""
        return self.batch_schedule.index(step - 1)

    def meta(self, state, chrono: Chrono) -> dict:
        step = int(state.step)
        return dict(
            config=json.loads(config_to_json(self.config)),
            data_position=step,
            ranks=self.world.size,
            elapsed=chrono.elapsed(),
            num_classes=len(self.store.class_names),
            class_names=list(self.store.class_names),
            store=str(self.store.path),
            snapshot=step in self.snapshot_steps,
        )


# --- set-up ----------------------------------------------------------------------------------------------------
def _open_data(config, workdir, world):
    pairs = batch_schedule.parse(config.train.batch_schedule, config.train.global_batch, config.optim.epochs)
    for _, gb in pairs:
        key = f"the global batch {gb} of train.batch_schedule" if len(pairs) > 1 else f"train.global_batch={gb}"
        if gb % world.size:
            raise ValueError(f"{key} is not divisible by the {world.size} MPI ranks; choose a multiple of {world.size}")
        num_microbatches(
            gb // world.size,
            config.train.microbatch,  # raises unless it divides
            f"{key} / {world.size} MPI rank(s)",
        )
    check_model(from_config(config.model), tuple(config.model.input_shape))  # before any data is prepared
    store = prepare_store(config, workdir, world)
    train_idx, val_idx = split_indices(store, config.data)
    h, w, c = store.image_shape
    if tuple(config.model.input_shape) != (h, w, c):
        raise ValueError(
            f"the store {store.path} holds {h}x{w}x{c} images but config.model.input_shape is "
            f"{tuple(config.model.input_shape)}: set --config.model.input_shape='({h}, {w}, {c})'"
        )
    return store, train_idx, val_idx


def _initial_state(config, model, tx, image_shape, ckpt, world, sched: BatchSchedule):
    """A fresh state, or rank 0's latest checkpoint; broadcast from rank 0 and checked to agree on all ranks.
    Returns it with the exchange's plan (``train.comm``) of each phase of the batch schedule."""
    params = init_params(model, jax.random.key(config.seed), image_shape)
    plans = tuple(
        exchange.make_plan(
            config.train.comm, params, p.global_batch // world.size, world.size, config.train.powersgd_rank
        )
        for p in sched.phases
    )
    state = create_state(params, tx, config.seed, plans[0])  # PowerSGD's state does not depend on the batch
    start = world.bcast_object(ckpt.resolve("latest"))
    if start is not None:
        state, _ = ckpt.restore(start, state)  # rank 0 reads; the others get its state from the broadcast
        logging.info(f"resuming from the checkpoint of step {start} in {ckpt.directory}")
    state = world.bcast_tree(state)  # every rank starts from rank 0's parameters ...
    world.check_same(state.params)  # ... which is checked
    return state, plans


def _train_batches(config, store, train_idx, world, sched: BatchSchedule, start_step: int):
    """``(step, batch)`` from ``start_step`` on, endless: each phase of the batch schedule from its own training
    Reader at the phase's batch (opened when the phase starts, closed when it ends or this generator is closed)."""

    for i, p in enumerate(sched.phases):
        end = sched.phases[i + 1].start_step if i + 1 < len(sched.phases) else None
        if end is not None and start_step >= end:
            continue
        offset = sched.reader_step(p.start_step) - p.start_step
        with contextlib.closing(
            Reader(
                store,
                train_idx,
                p.global_batch,
                rank=world.rank,
                num_ranks=world.size,
                seed=config.seed,
                augment=config.data.augment,
                train=True,
                prefetch=config.data.prefetch,
            )
        ) as reader:
            for reader_step, batch in reader.iterate(start_step + offset):
                if end is not None and reader_step - offset >= end:
                    break
                yield reader_step - offset, batch
        start_step = end


def _eval_reader(config, store, val_idx, world, stack):
    eval_batch = config.train.eval_batch or config.train.microbatch or config.train.global_batch // world.size
    return stack.enter_context(
        contextlib.closing(
            Reader(
                store,
                val_idx,
                eval_batch * world.size,
                rank=world.rank,
                num_ranks=world.size,
                seed=config.seed,
                augment=None,
                train=False,
                prefetch=config.data.prefetch,
            )
        )
    )


def _exchanger(config, world, stack):
    """``train.overlap``: the background sum of the dense layers' gradients (``nonblocking.Exchanger``), or None."""
    if not config.train.overlap:
        return None
    logging.info("train.overlap: the dense layers' gradients are summed while the branches' backward pass runs")
    return stack.enter_context(contextlib.closing(Exchanger(world.background_sum())))


def setup(config, workdir, world: World, stack: contextlib.ExitStack) -> Run:
    """Builds a run; every resource it opens is closed by ``stack``."""
    store, train_idx, val_idx = _open_data(config, workdir, world)
    image_shape, num_classes = store.image_shape, len(store.class_names)
    model = from_config(config.model, num_classes=num_classes)
    gb = config.train.global_batch
    sched = batch_schedule.schedule_from_config(config, len(train_idx))
    total_steps = config.train.max_steps or sched.total_steps(config.optim)
    snapshots = sched.snapshot_steps(config.optim)
    schedule = sched.lr_schedule(config.optim)
    tx = optim.make_optimizer(config.optim, schedule)
    ckpt = stack.enter_context(
        contextlib.closing(rank_checkpointer(workdir, world, config.train.keep_checkpoints, snapshots))
    )
    state, plans = _initial_state(config, model, tx, image_shape, ckpt, world, sched)
    for p, plan in zip(sched.phases, plans):
        logging.info(plan.describe() + ("" if sched.constant else f" (global batch {p.global_batch})"))
    exchanger = _exchanger(config, world, stack)
    train_steps = tuple(
        make_train_step(
            model,
            tx,
            num_classes,
            config.optim.label_smoothing,
            num_ranks=world.size,
            allreduce=world.allreduce_sum if world.size > 1 else None,
            schedule=schedule,
            microbatch=config.train.microbatch,
            plan=plan,
            allgather=world.allgather if world.size > 1 else None,
            exchanger=exchanger,
        )
        for plan in plans
    )  # one per phase: each compiles at its phase's first step
    eval_reader = _eval_reader(config, store, val_idx, world, stack)
    batches = stack.enter_context(
        contextlib.closing(_train_batches(config, store, train_idx, world, sched, int(state.step)))
    )
    log = stack.enter_context(contextlib.closing(MetricsLog(workdir, enabled=world.is_primary)))
    progress = stack.enter_context(
        contextlib.closing(
            Progress(
                total_steps,
                int(state.step),
                mode=config.train.progress,
                every=config.train.log_every_steps,
                enabled=world.is_primary,
            )
        )
    )
    profiler = stack.enter_context(contextlib.closing(Profiler(config.train.profile_steps, workdir, world.rank)))
    run = Run(
        config=config,
        workdir=workdir,
        world=world,
        store=store,
        batch_schedule=sched,
        start_step=int(state.step),
        total_steps=total_steps,
        state=state,
        train_steps=train_steps,
        batches=batches,
        evaluator=Evaluator(model, eval_reader, num_classes, world),
        ckpt=ckpt,
        log=log,
        progress=progress,
        profiler=profiler,
        train_flops=mcnn_flops(model, *image_shape)["train"],
        plans=plans,
        eval_steps=frozenset(sched.eval_steps(config.train.eval_every_epochs, total_steps)),
        snapshot_steps=tuple(snapshots),
    )
    h, w, c = image_shape
    mb = config.train.microbatch
    micro = f" (micro-batches of {mb} images)" if 0 < mb < gb // world.size else ""
    if world.is_primary:
        (workdir / "config.json").write_text(config_to_json(config))
    logging.info(
        f"{store.num_images} images in {store.path} ({len(train_idx)} train, {len(val_idx)} val, "
        f"{num_classes} classes, {h}x{w}x{c}); {world.size} rank(s) x {gb // world.size} images = "
        f"global batch {gb}{micro}; {sched.describe()}; training steps {run.start_step}..{total_steps}"
    )
    return run


# --- the loop --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """What the loop found out: how far it got, the evaluations, and why it stopped."""

    step: int
    best: float | None = None
    last_eval: dict | None = None
    reached: dict | None = None  # step, wall_s, accuracy when the target accuracy was reached
    preempted_at: int | None = None


def _run_step(run: Run, state, chrono: Chrono, step: int, signum: int):
    """Fetches the next global batch and runs the train step on it (with this rank's stop signal, summed over
    the ranks in the step's allreduce); returns the state, metrics and times."""
    t0 = time.perf_counter()
    chrono.begin()
    read_step, batch = next(run.batches)
    assert read_step == step - 1, (read_step, step)  # the batch of the step after read_step steps
    t1 = time.perf_counter()
    run.profiler.before(step)
    phase = run.phase(step)
    state, metrics = run.train_steps[phase](state, batch, np.float32(signum))  # compiled at its first call
    m = jax.device_get(metrics)
    t2 = time.perf_counter()
    run.profiler.after(step)
    p = run.batch_schedule.phases[phase]
    chrono.record(t1 - t0, t2 - t1, p.global_batch)
    if chrono.steps == 1:
        logging.info(f"the first step took {t2 - t1:.1f} s, {chrono.compile_s:.1f} s of it compiling")
    elif step - 1 == p.start_step and phase > 0:
        run.progress.log(
            f"epoch {p.start_epoch}: the global batch grows to {p.global_batch} "
            f"({p.steps_per_epoch} steps/epoch; learning rate {float(m['lr']):.4g})"
        )
    return state, m, t1 - t0, t2 - t1


def _diverged(run: Run, step: int, loss: float) -> TrainingDiverged:
    run.ckpt.wait()
    last = run.world.bcast_object(run.ckpt.resolve("latest"))
    kept, then = (
        (f"The last good checkpoint (step {last}) is kept in {run.ckpt.directory}", "to resume from it")
        if last is not None
        else (
            f"No checkpoint exists yet (the first would have been saved at step {_first_save(run)}), so "
            f"nothing is kept",
            "to start again from step 0",
        )
    )
    return TrainingDiverged(
        f"the training loss became {loss} at step {step}: stopping. {kept}. Lower the learning rate "
        f"(optim.base_lr, optim.warmup_init_lr), lengthen the warmup (optim.warmup_epochs) or clip the "
        f"gradients (optim.grad_clip), then rerun the same command {then}."
    )


def _first_save(run: Run) -> int:
    every = run.config.train.checkpoint_every_steps
    if every:
        return min(run.start_step + every, run.total_steps)
    return min([s for s in run.eval_steps if s > run.start_step], default=run.total_steps)


def _log_train(run: Run, step: int, m: dict, chrono: Chrono, wait_s: float, step_s: float):
    """The step's metrics into metrics.jsonl / TensorBoard, and the progress line."""
    loss, acc = float(m["loss_sum"] / max(m["count"], 1)), float(m["correct"] / max(m["count"], 1))
    phase = run.phase(step)
    gb = run.batch_schedule.phases[phase].global_batch
    if itstime(step, run.config.train.log_every_steps, run.total_steps):
        extra = {}
        if run.world.size > 1:  # collective: every rank measures at the same steps
            extra["allreduce_s"] = run.world.time_comm(**run.plans[phase].sizes())  # all of the step's collectives
        if not run.batch_schedule.constant:
            extra["global_batch"] = gb
        run.log.write(
            "train",
            step,
            loss=loss,
            accuracy=acc,
            lr=float(m["lr"]),
            grad_norm=float(m["grad_norm"]),
            images_per_s=gb / max(wait_s + step_s, 1e-9),
            epoch=run.batch_schedule.epoch(step),
            data_wait_s=wait_s,
            step_s=step_s,
            wall=chrono.elapsed(),
            gflop_per_s=run.train_flops * gb / max(step_s, 1e-9) / 1e9,
            **extra,
        )
    run.progress.set(step, loss=loss, acc=acc, lr=float(m["lr"]), **{"img/s": chrono.images_per_s})


def _evaluate(run: Run, state, step: int, chrono: Chrono, out: Outcome) -> float:
    ev = out.last_eval = run.evaluator.run(state.params)
    val_acc, wall = float(ev["accuracy"]), chrono.elapsed()
    treatment = {k: ev[k] for k in ("treatment_accuracy", "treatments") if ev.get(k) is not None}
    epoch = run.batch_schedule.epoch(step)
    run.log.write(
        "val",
        step,
        loss=ev["loss"],
        accuracy=val_acc,
        epoch=epoch,
        wall=wall,
        per_class_accuracy=ev["per_class_accuracy"],
        confusion=ev["confusion"],
        class_names=run.store.class_names,
        **treatment,
    )
    run.progress.log(
        f"step {step} (epoch {epoch:.2f}): validation accuracy {val_acc:.4f}, "
        f"loss {ev['loss']:.4f} on {ev['count']} images"
    )
    out.best = val_acc if out.best is None else max(out.best, val_acc)
    target = run.config.train.target_accuracy
    if target and val_acc >= target and out.reached is None:
        out.reached = dict(step=step, wall_s=wall, accuracy=val_acc)
        run.progress.log(f"target accuracy {target} reached at step {step}: time to train {wall:.1f} s")
    return val_acc


def _loop(run: Run, stop: StopRequest, chrono: Chrono) -> tuple[Any, Outcome]:
    state, out = run.state, Outcome(step=run.start_step)
    ckpt_every = run.config.train.checkpoint_every_steps  # 0: at the evaluations
    while out.step < run.total_steps:
        state, m, wait_s, step_s = _run_step(run, state, chrono, out.step + 1, stop.signum)
        step = out.step = out.step + 1
        loss = float(m["loss_sum"] / max(m["count"], 1))
        if not math.isfinite(loss):
            raise _diverged(run, step, loss)
        _log_train(run, step, m, chrono, wait_s, step_s)
        evaluate = step in run.eval_steps or step in run.snapshot_steps
        val_acc = _evaluate(run, state, step, chrono, out) if evaluate else None
        preempted = m["stop"] > 0  # some rank caught a signal before this step: summed in the step's allreduce
        if evaluate or itstime(step, ckpt_every, run.total_steps) or preempted or out.reached:
            run.ckpt.save(state, run.meta(state, chrono), val_accuracy=val_acc, wait=preempted)
        if preempted:
            run.progress.log(f"signal received: saved the checkpoint of step {step}; rerun the same command to resume")
            out.preempted_at = step
        if preempted or out.reached:
            break
    return state, out


def _summary(run: Run, out: Outcome, chrono: Chrono) -> dict:
    summary = dict(
        start_step=run.start_step,
        total_steps=run.total_steps,
        ranks=run.world.size,
        global_batch=run.config.train.global_batch,
    )
    if not run.batch_schedule.constant:
        summary["batch_schedule"] = [[p.start_epoch, p.global_batch] for p in run.batch_schedule.phases]
    if out.preempted_at is not None:
        summary["preempted_at_step"] = out.preempted_at
    summary.update(
        final_step=out.step,
        wall_s=chrono.elapsed(),
        steps_run=out.step - run.start_step,
        **chrono.summary(),
        best_val_accuracy=out.best,
        target_accuracy=run.config.train.target_accuracy or None,
        time_to_target_s=out.reached and out.reached["wall_s"],
        target_reached_at_step=out.reached and out.reached["step"],
        final_val_accuracy=None if out.last_eval is None else float(out.last_eval["accuracy"]),
        class_names=run.store.class_names,
    )
    return summary


def train_and_evaluate(config, workdir, world: World | None = None) -> dict:
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns the summary (with the final params)."""
    world = world or init_world()
    workdir = Path(workdir).absolute()
    if world.is_primary:
        workdir.mkdir(parents=True, exist_ok=True)
    setup_logging(workdir, world.rank, world.size)
    logging.info(f"rank {world.rank}/{world.size}: pid {os.getpid()} on {os.uname().nodename}")
    with contextlib.ExitStack() as stack:
        run = setup(config, workdir, world, stack)
        stop = stack.enter_context(StopRequest())
        chrono = Chrono(run.batch_schedule.phase(run.start_step).global_batch)
        state, out = _loop(run, stop, chrono)
        summary = _summary(run, out, chrono)
    summary["wall_s"] = chrono.elapsed()
    if world.is_primary:
        tmp = workdir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, workdir / "summary.json")
        run.progress.log("summary: " + json.dumps({k: v for k, v in summary.items() if k != "class_names"}))
    summary["params"] = host_tree(state.params)
    return summary
