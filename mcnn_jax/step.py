"""The train state and the one jitted, pure train step ``(state, batch, stop=0) -> (state, metrics)``.

A step has three parts, in this order:

1. ``rank_gradients``: the gradient of this rank's mean loss and the metric sums over its local batch, in micro-batches
   of ``microbatch`` images (``train.microbatch``) accumulated by a ``lax.scan`` inside the step, so that peak memory
   follows the micro-batch, not the local batch. The dense layers that the exchange plan
   (``mcnn_jax.parallel.exchange.Plan``, ``train.comm``) factors yield their inputs X and output gradients D instead of
   a weight gradient; the micro-batches' factors are stacked, so they are gathered once per step;
2. ``exchange_gradients``: the summed gradients, the metric sums and the stop signal packed into ONE flat float32
   buffer and summed over the ranks with ONE allreduce (``allreduce``: ``World.allreduce_sum``; GradientFlow's fused
   "lazy" allreduce), the factors of all factored layers in at most ONE allgather (``World.allgather``), whatever the
   number of micro-batches (PowerSGD: two allreduces, P then Q). No host-side MPI call is needed per step:
   ``metrics["stop"]`` is the sum over ranks of the ``stop`` argument (the signal a rank caught). With ``train.overlap``
   (``exchanger``; ``overlapped_gradients``, ``mcnn_jax.parallel.overlap``) the last micro-batch's backward pass runs in
   two stages and the dense layers' summed gradients leave that allreduce: they are summed by ONE background allreduce
   (``nonblocking.Exchanger``) started after the head's backward pass and waited for after the branches' (one background
   allreduce + one packed mpi4jax allreduce + at most one allgather);
3. ONE optimizer update.

Why not ``optax.MultiSteps``: it accumulates over successive calls of the train step, one micro-batch per call,
so each call would run its own allreduce (k allreduces of the whole gradient per update instead of one), the
accumulator would live in the optimizer state (a different checkpoint layout for each ``microbatch``), the
state's step and the schedule would count micro-batches, and every micro-batch would pay a dispatch and a
transfer of the metrics to the host. Accumulating inside the one jitted step keeps one allreduce, one update,
one step per global batch and the same checkpoints.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import unflatten_dict

from mcnn_jax.optim import smoothed_targets
from mcnn_jax.parallel import exchange, overlap


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so that it checkpoints as a plain array
    exchange_state: Any = None  # the exchange's own state (PowerSGD's Q and error feedback); not checkpointed


CHECKPOINTED = ("step", "params", "opt_state", "rng")  # the fields a checkpoint holds


def create_state(params, tx: optax.GradientTransformation, seed: int, plan: exchange.Plan | None = None) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        exchange_state=exchange.powersgd_init(plan, seed) if plan is not None and plan.compressed else None,
    )


def _mask(batch):
    mask = batch.get("mask")
    return jnp.ones(batch["label"].shape, jnp.float32) if mask is None else mask


def loss_and_metrics(model, params, batch, num_classes: int, label_smoothing: float, denominator=None):
    """The (masked) smoothed cross-entropy summed over ``batch`` and divided by ``denominator`` (default: the
    batch's unmasked count, i.e. the mean); metrics are sums, so they add up across batches and ranks."""
    logits = model.apply({"params": params}, batch["image"])
    labels, mask = batch["label"], _mask(batch)
    per_example = optax.softmax_cross_entropy(logits, smoothed_targets(labels, num_classes, label_smoothing))
    count = mask.sum()
    loss = (per_example * mask).sum() / (_count(batch) if denominator is None else denominator)
    correct = ((jnp.argmax(logits, -1) == labels) * mask).sum()
    return loss, dict(loss_sum=(per_example * mask).sum(), correct=correct, count=count), logits


def num_microbatches(local_batch: int, microbatch: int, where: str = "train.global_batch / MPI ranks") -> int:
    """How many micro-batches of ``microbatch`` images make the local batch (``microbatch`` 0: one, the whole
    batch). A micro-batch that does not divide the local batch is a ValueError naming the config keys."""
    if microbatch == 0 or microbatch == local_batch:
        return 1
    if microbatch < 0 or local_batch % microbatch:
        raise ValueError(
            f"train.microbatch={microbatch} does not divide the local batch of {local_batch} images "
            f"per rank ({where}); choose a divisor of {local_batch} (or 0 for the whole local batch)"
        )
    return local_batch // microbatch


def rank_gradients(
    model,
    params,
    batch,
    num_classes: int,
    label_smoothing: float = 0.0,
    microbatch: int = 0,
    plan: exchange.Plan | None = None,
    denominator=None,
):
    """(gradients, metric sums, factors) of this rank's local batch: the gradient of its mean loss (the loss summed
    over the batch / the batch's count) as a flat dict keyed by parameter paths, without the kernels of the
    layers ``plan`` factors, whose ``{path: (X, D)}`` come instead (``exchange.gradients_and_factors``). Computed over
    micro-batches of ``microbatch`` images by a ``lax.scan`` that adds up each micro-batch's gradient of (its
    loss sum / the whole batch's count) and its metric sums, and stacks its factors (rows of the local batch).
    With one micro-batch it is the plain gradient of the batch's mean loss. ``denominator``: the count to divide
    by (default: ``batch``'s own)."""
    plan = plan or exchange.Plan("allreduce", 1, 0, 0)
    k = num_microbatches(batch["label"].shape[0], microbatch)
    loss_fn = _loss_fn(model, num_classes, label_smoothing, _count(batch) if denominator is None else denominator)

    def grad_fn(mb):
        metrics, grads, factors = exchange.gradients_and_factors(plan, lambda p: loss_fn(p, mb), params)
        return (grads, metrics), factors

    if k == 1:
        (grads, metrics), factors = grad_fn(batch)
        return grads, metrics, factors
    micro = jax.tree_util.tree_map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

    def accumulate(total, mb):
        summed, factors = grad_fn(mb)
        return jax.tree_util.tree_map(jnp.add, total, summed), factors

    zeros = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, jax.tree_util.tree_map(lambda x: x[0], micro))[0]
    )
    (grads, metrics), factors = jax.lax.scan(accumulate, zeros, micro)
    factors = jax.tree_util.tree_map(lambda f: f.reshape(-1, f.shape[-1]), factors)  # [k, mb, n] -> [k mb, n]
    return grads, metrics, factors


def _count(batch):
    """The number of real (unmasked) images of ``batch``, at least 1: what its mean loss divides by."""
    return jnp.maximum(_mask(batch).sum(), 1.0)


def _loss_fn(model, num_classes: int, label_smoothing: float, denominator):
    """``(params, micro-batch) -> (loss, metrics)``: the micro-batch's loss sum / ``denominator``."""

    def loss_fn(p, mb):
        loss, metrics, _ = loss_and_metrics(model, p, mb, num_classes, label_smoothing, denominator)
        return loss, metrics

    return loss_fn


def overlapped_gradients(
    model,
    params,
    batch,
    num_classes: int,
    label_smoothing: float,
    microbatch: int,
    plan: exchange.Plan,
    exchanger,
    sums: dict,
    allreduce=None,
    allgather=None,
):
    """``train.overlap``: the local gradients and their exchange, with the head's sum travelling during the last
    micro-batch's branch backward pass (``mcnn_jax.parallel.overlap``). The first k-1 micro-batches run in the
    ``lax.scan`` of ``rank_gradients``; the last in two stages. ``sums``: the stop signal (and anything else
    to sum). Returns (the mean gradients as a flat dict, the summed metrics and ``sums``)."""
    n = batch["label"].shape[0]
    k = num_microbatches(n, microbatch)
    size, denominator = n // k, _count(batch)
    loss_fn = _loss_fn(model, num_classes, label_smoothing, denominator)
    last = jax.tree_util.tree_map(lambda x: x[n - size :], batch)
    metrics, head, factors, d_feats, body_vjp = overlap.stage_one(model, loss_fn, plan, params, last)
    earlier = None
    if k > 1:
        first = jax.tree_util.tree_map(lambda x: x[: n - size], batch)
        earlier, m0, f0 = rank_gradients(model, params, first, num_classes, label_smoothing, size, plan, denominator)
        head = {key: g + earlier.pop(key) for key, g in head.items()}
        metrics = jax.tree_util.tree_map(jnp.add, metrics, m0)
        factors = exchange.concat_factors([f0, factors]) if factors else factors
    sums = dict({key: v.astype(jnp.float32) for key, v in metrics.items()}, **sums)
    return overlap.exchange_overlapped(
        plan, exchanger, head, d_feats, body_vjp, earlier, factors, sums, allreduce, allgather
    )


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    num_classes: int,
    label_smoothing: float = 0.0,
    allreduce: Callable[[jax.Array], jax.Array] | None = None,
    num_ranks: int = 1,
    schedule: optax.Schedule | None = None,
    microbatch: int = 0,
    plan: exchange.Plan | None = None,
    allgather: Callable[[jax.Array], jax.Array] | None = None,
    exchanger=None,
):
    """Returns the jitted train step ``(state, batch, stop=0) -> (state, metrics)``. ``allreduce`` sums a flat
    float32 buffer over the ``num_ranks`` ranks, ``allgather`` stacks one per rank; ``plan``
    (``exchange.make_plan``) says which dense layers are exchanged as factors or compressed (None: every gradient is
    summed). ``microbatch`` > 0 processes each rank's local batch in micro-batches of that many images (one
    exchange and one update per call all the same). ``exchanger`` (a ``nonblocking.Exchanger``; None: no
    overlap) sums the head's dense gradients while the branches' backward pass runs (``train.overlap``)."""
    plan = plan or exchange.Plan("allreduce", num_ranks, 0, 0)
    if plan.ranks != num_ranks:
        raise ValueError(f"the exchange plan is for {plan.ranks} ranks, the step for {num_ranks}")
    if exchanger is not None and plan.compressed:
        raise ValueError(
            f"train.overlap=True supports the exact exchanges (train.comm 'auto', 'allreduce', "
            f"'factored'), not train.comm={plan.scheme!r}: set train.overlap=False"
        )

    def gradients(params, batch, stop, comm_state):
        sums = dict(stop=jnp.asarray(stop, jnp.float32))
        if exchanger is not None:
            grads, sums = overlapped_gradients(
                model,
                params,
                batch,
                num_classes,
                label_smoothing,
                microbatch,
                plan,
                exchanger,
                sums,
                allreduce,
                allgather,
            )
            return grads, sums, comm_state
        grads, metrics, factors = rank_gradients(model, params, batch, num_classes, label_smoothing, microbatch, plan)
        sums = dict({k: v.astype(jnp.float32) for k, v in metrics.items()}, **sums)
        return exchange.exchange_gradients(plan, grads, factors, sums, comm_state, allreduce, allgather)

    def train_step(state: TrainState, batch, stop=0.0):
        grads, sums, comm_state = gradients(state.params, batch, stop, state.exchange_state)
        grads = unflatten_dict(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(sums, grad_norm=optax.tree.norm(grads))
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, exchange_state=comm_state
        ), metrics

    return jax.jit(train_step, donate_argnums=(0,))  # the old state's buffers are reused


def mean_log_probs(logits):
    """The log of the mean over the members (axis 0 of ``logits`` [members, N, classes]) of their class
    probabilities (one member: its log-softmax)."""
    return jax.nn.logsumexp(jax.nn.log_softmax(logits), axis=0) - jnp.log(logits.shape[0])
