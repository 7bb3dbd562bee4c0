"""The train state and the one jitted, pure train step ``(state, batch, stop) -> (state, metrics)``.

Data parallelism enters through ``allreduce`` (sums one flat float32 buffer over all ranks,
``mcnn_jax.distributed.World.allreduce_sum``) and ``allgather`` (``World.allgather``), used as the
``mcnn_jax.comm.Plan`` says (``train.comm``): the summed gradients, the step's metric sums and the stop signal
travel in ONE packed allreduce (GradientFlow's fused "lazy" allreduce); the factored dense layers' inputs and
output gradients in at most one packed allgather. No host-side MPI call is needed per step: ``metrics["stop"]``
is the sum over ranks of the ``stop`` argument (a rank that caught SIGTERM passes its signal number).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import unflatten_dict

from . import comm
from .optim import smoothed_targets


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so that it checkpoints as a plain array
    comm: Any = None  # the exchange's own state (PowerSGD's Q and error feedback); not checkpointed

CHECKPOINTED = ("step", "params", "opt_state", "rng")  # the fields a checkpoint holds


def create_state(params, tx: optax.GradientTransformation, seed: int, plan: comm.Plan | None = None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      comm=comm.powersgd_init(plan, seed) if plan is not None and plan.compressed else None)


def loss_and_metrics(model, params, batch, num_classes: int, label_smoothing: float):
    """Mean (masked) smoothed cross-entropy; metrics are sums, so they add up across batches and ranks."""
    logits = model.apply({"params": params}, batch["image"])
    labels = batch["label"]
    mask = batch.get("mask")
    if mask is None:
        mask = jnp.ones(labels.shape, jnp.float32)
    per_example = optax.softmax_cross_entropy(logits, smoothed_targets(labels, num_classes, label_smoothing))
    count = mask.sum()
    loss = (per_example * mask).sum() / jnp.maximum(count, 1.0)
    correct = ((jnp.argmax(logits, -1) == labels) * mask).sum()
    return loss, dict(loss_sum=(per_example * mask).sum(), correct=correct, count=count), logits


def make_train_step(model, tx: optax.GradientTransformation, num_classes: int, label_smoothing: float = 0.0,
                    allreduce: Callable[[jax.Array], jax.Array] | None = None, num_ranks: int = 1,
                    schedule: optax.Schedule | None = None, plan: comm.Plan | None = None,
                    allgather: Callable[[jax.Array], jax.Array] | None = None):
    """Returns the jitted train step ``(state, batch, stop=0) -> (state, metrics)``. ``allreduce`` sums a flat
    float32 buffer over the ``num_ranks`` ranks, ``allgather`` stacks one; ``plan`` (``comm.make_plan``) says
    which dense layers are exchanged as factors or compressed (None: every gradient is summed)."""
    plan = plan or comm.Plan("allreduce", num_ranks, 0, 0)
    if plan.ranks != num_ranks:
        raise ValueError(f"the exchange plan is for {plan.ranks} ranks, the step for {num_ranks}")

    def train_step(state: TrainState, batch, stop=0.0):
        def loss_fn(params):
            loss, metrics, _ = loss_and_metrics(model, params, batch, num_classes, label_smoothing)
            return loss, metrics

        metrics, grads, factors = comm.local_gradients(plan, loss_fn, state.params)
        sums = {k: metrics[k].astype(jnp.float32) for k in metrics}
        sums["stop"] = jnp.asarray(stop, jnp.float32)
        grads, sums, comm_state = comm.exchange(plan, grads, factors, sums, state.comm, allreduce, allgather)
        grads = unflatten_dict(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(sums, grad_norm=optax.tree.norm(grads))
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, comm=comm_state), metrics

    return jax.jit(train_step, donate_argnums=(0,))  # the old state's buffers are reused


def make_eval_step(model, num_classes: int):
    """Jitted ``(params, batch) -> (metrics, predictions)``; metrics are masked sums."""

    def eval_step(params, batch):
        _, metrics, logits = loss_and_metrics(model, params, batch, num_classes, 0.0)
        return metrics, jnp.argmax(logits, -1)

    return jax.jit(eval_step)

