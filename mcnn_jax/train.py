"""The training loop: data, model, optimizer and checkpoints from one config, on one or many MPI ranks.

``train_and_evaluate(config, workdir)`` resumes from the latest checkpoint in ``workdir`` if there is one, runs
the jitted train step over the reader's global batches, evaluates periodically, saves checkpoints, and
returns (and writes to ``<workdir>/summary.json``) a summary with the time to train to the target accuracy.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np

from . import optim
from .checkpoint import Checkpointer, config_to_json, host_tree
from .distributed import World, init_world
from .metrics_log import MetricsLog, Progress
from .models import from_config, init_params
from .step import create_state, make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


# --- data ------------------------------------------------------------------------------------------------------
def store_path(config, workdir) -> Path:
    return Path(config.data.store) if config.data.store else Path(workdir) / "data" / "store"


def prepare_store(config, workdir, world: World, log=print):
    """Opens the config's store; with ``data.synthetic.enabled`` and no ``data.store``, rank 0 first generates
    the synthetic screen into ``<workdir>/data`` (once: a complete store is reused)."""
    from .data import open_store, prepare_synthetic_store
    from .data.synthetic import Camera

    syn = config.data.synthetic
    if syn.enabled and not config.data.store:
        if world.is_primary:
            log(f"preparing the synthetic screen ({syn.num_images} images, {syn.num_classes} classes, "
                f"{syn.height}x{syn.width}) in {Path(workdir) / 'data'}")
            prepare_synthetic_store(Path(workdir) / "data", num_images=syn.num_images,
                                    num_classes=syn.num_classes, height=syn.height, width=syn.width,
                                    seed=syn.seed, camera=Camera(syn.background, syn.saturation, syn.bits))
        world.barrier()
    path = store_path(config, workdir)
    if not path.exists():
        raise FileNotFoundError(
            f"no image store at {path}: import one first (mcnn-data bbbc021|folder|synthetic ... --out {path}) "
            f"or set --config.data.store")
    return open_store(path)


# --- evaluation ------------------------------------------------------------------------------------------------
def evaluate(eval_step, params, reader, num_classes: int, world: World) -> dict:
    """Loss, accuracy, per-class accuracy and the confusion matrix (rows: true class) over the reader's pass."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    loss_sum = 0.0
    for _, batch in reader.iterate():
        metrics, pred = eval_step(params, batch)
        mask = batch["mask"] > 0
        np.add.at(confusion, (batch["label"][mask], np.asarray(pred)[mask]), 1)
        loss_sum += float(metrics["loss_sum"])
    if world.size > 1:
        from mpi4py import MPI
        world.comm.Allreduce(MPI.IN_PLACE, confusion, op=MPI.SUM)
        loss_sum = world.comm.allreduce(loss_sum, op=MPI.SUM)
    count = confusion.sum()
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return dict(loss=loss_sum / max(count, 1), accuracy=confusion.trace() / max(count, 1),
                per_class_accuracy=per_class, confusion=confusion, count=int(count))


# --- signals ---------------------------------------------------------------------------------------------------
class StopRequest:
    """SIGTERM / SIGINT (a cluster preempting the job, or Ctrl-C) ask the loop to checkpoint and exit; a second
    SIGINT interrupts at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


# --- the loop --------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir, world: World | None = None) -> dict:
    from .data import Reader, split_indices

    world = world or init_world()
    workdir = Path(workdir).absolute()
    if world.is_primary:
        workdir.mkdir(parents=True, exist_ok=True)
    progress_log = (lambda msg: print(msg, flush=True)) if world.is_primary else (lambda msg: None)

    store = prepare_store(config, workdir, world, progress_log)
    train_idx, val_idx = split_indices(store, config.data)
    h, w, c = store.image_shape
    if tuple(config.model.input_shape) != (h, w, c):
        raise ValueError(f"the store {store.path} holds {h}x{w}x{c} images but config.model.input_shape is "
                         f"{tuple(config.model.input_shape)}: set --config.model.input_shape='({h}, {w}, {c})'")
    num_classes = len(store.class_names)
    model = from_config(config.model, num_classes=num_classes)

    global_batch = config.train.global_batch
    if global_batch % world.size:
        raise ValueError(f"train.global_batch={global_batch} is not divisible by the {world.size} MPI ranks; "
                         f"choose a multiple of {world.size}")
    spe = optim.steps_per_epoch(len(train_idx), global_batch)
    total_steps = config.train.max_steps or math.ceil(config.optim.epochs * spe)
    schedule = optim.make_schedule(config.optim, spe, global_batch)
    tx = optim.make_optimizer(config.optim, schedule)

    state = create_state(init_params(model, jax.random.key(config.seed), (h, w, c)), tx, config.seed)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, write=world.is_primary,
                        read=world.is_primary)
    start = world.bcast_object(ckpt.resolve("latest") if world.is_primary else None)
    if start is not None:
        if world.is_primary:
            state, _ = ckpt.restore(start, state)
            progress_log(f"resuming from the checkpoint of step {start} in {ckpt.directory}")
    state = world.bcast_tree(state)  # every rank starts from rank 0's parameters ...
    world.check_same(state.params)  # ... which is checked
    start_step = int(state.step)

    allreduce = world.allreduce_sum if world.size > 1 else None
    train_step = make_train_step(model, tx, num_classes, config.optim.label_smoothing, allreduce=allreduce,
                                 num_ranks=world.size, schedule=schedule)
    eval_step = make_eval_step(model, num_classes)
    local_batch = global_batch // world.size
    reader = Reader(store, train_idx, global_batch, rank=world.rank, num_ranks=world.size, seed=config.seed,
                    augment=config.data.augment, train=True, prefetch=config.data.prefetch)
    eval_reader = Reader(store, val_idx, (config.train.eval_batch or local_batch) * world.size, rank=world.rank,
                         num_ranks=world.size, seed=config.seed, augment=None, train=False,
                         prefetch=config.data.prefetch)
    eval_every = max(1, round(config.train.eval_every_epochs * spe))
    ckpt_every = config.train.checkpoint_every_steps or eval_every

    log = MetricsLog(workdir, enabled=world.is_primary)
    progress = Progress(total_steps, start_step, config.train.progress, config.train.log_every_steps,
                        enabled=world.is_primary)
    if world.is_primary:
        (workdir / "config.json").write_text(config_to_json(config))
        progress.log(f"{store.num_images} images in {store.path} ({len(train_idx)} train, {len(val_idx)} val, "
                     f"{num_classes} classes, {h}x{w}x{c}); {world.size} rank(s) x {local_batch} images = global "
                     f"batch {global_batch}; {spe} steps/epoch; training steps {start_step}..{total_steps}")
    summary = dict(start_step=start_step, total_steps=total_steps, ranks=world.size, global_batch=global_batch)
    stop = StopRequest()
    t_first = time.perf_counter()
    time_wait = time_step = 0.0
    reached = None
    best = None
    step = start_step
    last_eval = None

    def meta():
        return dict(config=json.loads(config_to_json(config)), data_position=int(state.step),
                    ranks=world.size, elapsed=time.perf_counter() - t_first, num_classes=num_classes,
                    class_names=list(store.class_names), store=str(store.path))

    try:
        batches = reader.iterate(start_step=start_step)
        while step < total_steps:
            t0 = time.perf_counter()
            _, batch = next(batches)
            t1 = time.perf_counter()
            state, metrics = train_step(state, batch)
            m = jax.device_get(metrics)
            t2 = time.perf_counter()
            time_wait += t1 - t0
            time_step += t2 - t1
            step += 1
            loss = float(m["loss_sum"] / max(m["count"], 1))
            if not math.isfinite(loss):
                ckpt.wait()
                last = ckpt.resolve("latest") if world.is_primary else None
                raise TrainingDiverged(
                    f"the training loss became {loss} at step {step}: stopping. The last good checkpoint "
                    f"(step {last}) is kept in {ckpt.directory}; lower optim.base_lr or set optim.grad_clip, "
                    f"then rerun to resume from it.")
            train_acc = float(m["correct"] / max(m["count"], 1))
            ips = global_batch / max(t2 - t0, 1e-9)
            if world.is_primary and (step % config.train.log_every_steps == 0 or step == total_steps):
                log.write("train", step, loss=loss, accuracy=train_acc, lr=float(m["lr"]),
                          grad_norm=float(m["grad_norm"]), images_per_s=ips, epoch=step / spe,
                          data_wait_s=t1 - t0, step_s=t2 - t1, wall=time.perf_counter() - t_first)
            progress.update(step, ips, loss=loss, acc=train_acc, lr=float(m["lr"]))

            val_acc = None
            if step % eval_every == 0 or step == total_steps:
                ev = evaluate(eval_step, state.params, eval_reader, num_classes, world)
                val_acc = float(ev["accuracy"])
                last_eval = ev
                wall = time.perf_counter() - t_first
                log.write("val", step, loss=ev["loss"], accuracy=val_acc, epoch=step / spe, wall=wall,
                          per_class_accuracy=ev["per_class_accuracy"], confusion=ev["confusion"],
                          class_names=store.class_names)
                progress.log(f"step {step} (epoch {step / spe:.2f}): validation accuracy {val_acc:.4f}, "
                             f"loss {ev['loss']:.4f} on {ev['count']} images")
                best = val_acc if best is None else max(best, val_acc)
                if config.train.target_accuracy and val_acc >= config.train.target_accuracy and reached is None:
                    reached = dict(step=step, wall_s=wall, accuracy=val_acc)
                    progress.log(f"target accuracy {config.train.target_accuracy} reached at step {step}: "
                                 f"time to train {wall:.1f} s")
            preempted = world.allreduce_max(stop.signum) > 0
            if val_acc is not None or step % ckpt_every == 0 or preempted or reached or step == total_steps:
                ckpt.save(state, meta(), val_accuracy=val_acc, wait=preempted)
            if preempted:
                progress.log(f"signal received: saved the checkpoint of step {step}; rerun the same command "
                             f"to resume")
                summary["preempted_at_step"] = step
                break
            if reached:
                break
    finally:
        stop.restore()
        reader.close()
        eval_reader.close()
        ckpt.close()
        progress.close()
        log.close()

    wall = time.perf_counter() - t_first
    steps_run = step - start_step
    summary.update(
        final_step=step, wall_s=wall, steps_run=steps_run,
        images_per_s=steps_run * global_batch / max(time_wait + time_step, 1e-9),
        data_wait_fraction=time_wait / max(time_wait + time_step, 1e-9),
        best_val_accuracy=best, target_accuracy=config.train.target_accuracy or None,
        time_to_target_s=reached and reached["wall_s"], target_reached_at_step=reached and reached["step"],
        final_val_accuracy=None if last_eval is None else float(last_eval["accuracy"]),
        class_names=store.class_names)
    if world.is_primary:
        tmp = workdir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, workdir / "summary.json")
        progress.log("summary: " + json.dumps({k: v for k, v in summary.items() if k != "class_names"}))
    summary["params"] = host_tree(state.params)
    return summary
