"""The train state and the one jitted, pure train step ``(state, batch) -> (state, metrics)``.

Data parallelism enters through ``allreduce``: a function that sums one flat float32 buffer over all ranks
(``mcnn_jax.distributed.World.allreduce_sum``). The gradients and the step's metric sums are packed into ONE
buffer, so MPI needs one allreduce per step (GradientFlow's fused "lazy" allreduce).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from .optim import smoothed_targets


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so that it checkpoints as a plain array


def create_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


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
                    schedule: optax.Schedule | None = None):
    """Returns the jitted train step. ``allreduce`` sums a flat float32 buffer over the ``num_ranks`` ranks: the
    gradients (then divided by ``num_ranks``) and the metric sums travel in one buffer."""

    def train_step(state: TrainState, batch):
        def loss_fn(params):
            loss, metrics, _ = loss_and_metrics(model, params, batch, num_classes, label_smoothing)
            return loss, metrics

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
        if allreduce is not None:  # gradients and metric sums: ONE buffer, ONE allreduce
            names = sorted(metrics)
            flat, unravel = ravel_pytree((grads, [metrics[k].astype(jnp.float32) for k in names]))
            grads, sums = unravel(allreduce(flat))
            grads = jax.tree_util.tree_map(lambda g: g / num_ranks, grads)
            metrics = dict(zip(names, sums))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(train_step, donate_argnums=(0,))  # the old state's buffers are reused


def make_eval_step(model, num_classes: int):
    """Jitted ``(params, batch) -> (metrics, class probabilities)``; metrics are masked sums."""

    def eval_step(params, batch):
        _, metrics, logits = loss_and_metrics(model, params, batch, num_classes, 0.0)
        return metrics, jax.nn.softmax(logits, -1)

    return jax.jit(eval_step)

