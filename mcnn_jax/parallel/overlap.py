"""The two-stage backward pass (``train.overlap``): the head's gradient sum travels while the branches' backward runs.

98.5% of the M-CNN's gradient bytes are the first dense layer's kernel. Its gradient is known once the forward
pass and the head's backward pass have run; the convolution branches' backward pass, most of a step's compute,
does not need its sum. So the local gradients of the last (or only) micro-batch are computed in two stages:

1. ``stage_one``: the body (every layer before the first dense layer, the "cut") forward under ``jax.vjp``,
   giving the features at the cut; then the head (the dense layers) as a function of its parameters and those
   features: the head's gradients (or, for the dense layers the plan factors, their X and D, as
   ``exchange.gradients_and_factors`` gives them), the metric sums and ``d_features``;
2. ``exchange``: ``Exchanger.start`` of the head's summed dense gradients (packed into one buffer on the host), which
   passes ``d_features`` through, so that the branches' backward (the body's vjp on ``d_features``) runs after
   the start; ``Exchanger.finish`` takes the branches' gradients as an operand, so that it waits only after
   them; meanwhile the sum travels on the exchanger's thread. (``jax.lax.optimization_barrier`` would not do:
   XLA:CPU's compiler drops it, and the finish ran right after the start.) The rest
   goes as without overlap (``exchange.exchange_exact``): the body's gradients, the metric sums and the stop signal
   in the one packed mpi4jax allreduce, the factored layers' X and D in at most one mpi4jax allgather.

Collectives per step with overlap: one background allreduce (the head's summed dense layers: kernels and
biases), one packed mpi4jax allreduce (the rest), at most one mpi4jax allgather (the factors). Exact: the same
sums as without overlap, in float32. The head must be the model's tail: the dense layers are called after every
other layer and use only the cut's features (checked while tracing, from the jaxpr: a clear error otherwise).
"""

from __future__ import annotations

import flax.linen as nn
import jax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.interpreters import partial_eval as pe

from mcnn_jax.parallel import exchange

FEATURES = ("__features__",)  # the cut's features, as one more "parameter" of the head


class _Cut(Exception):
    """Raised at the cut to end the body's forward pass there (while tracing) with the cut's input."""

    def __init__(self, x):
        super().__init__("the cut")
        self.x = x


def _calls(path, context) -> bool:
    return context.method_name == "__call__" and tuple(context.module.path) == path


def split(model, params, images) -> tuple[tuple, set]:
    """The cut (the path of the first dense layer the model calls) and the head's parameter keys (the dense
    layers', as flat-dict paths)."""
    layers = {la.path for la in exchange.dense_layers(params)}
    order = []

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path in layers and path not in order:
            order.append(path)
        return next_fun(*args, **kwargs)

    def run(p):
        with nn.intercept_methods(record):
            return model.apply({"params": p}, images)

    jax.eval_shape(run, params)
    if not order:
        raise ValueError("train.overlap=True needs a model with dense layers (flax nn.Dense) at its end")
    head = {k for k in flatten_dict(params) if any(k[: len(p)] == p for p in layers)}
    return order[0], head


def _features(model, params, images, cut):
    """The input of the cut layer: the body's forward pass only (stopped at the cut)."""

    def stop(next_fun, args, kwargs, context):
        if _calls(cut, context):
            raise _Cut(args[0])
        return next_fun(*args, **kwargs)

    try:
        with nn.intercept_methods(stop):
            model.apply({"params": params}, images)
    except _Cut as c:
        return c.x
    raise ValueError(f"the model never called its dense layer {'/'.join(cut)}")


def _head_loss(loss_fn, body: dict, cut, batch):
    """``(head params + FEATURES as a tree) -> (loss, metrics)``, and the interceptor that feeds the features to
    the cut layer (installed outside ``exchange.gradients_and_factors``, so that a factored cut layer records them
    as X). The body's forward pass is traced too but nothing uses it: XLA drops it."""
    holder = {}

    def feed(next_fun, args, kwargs, context):
        if _calls(cut, context):
            return next_fun(holder["x"].astype(args[0].dtype), *args[1:], **kwargs)
        return next_fun(*args, **kwargs)

    def head_loss(tree):
        flat = flatten_dict(tree)
        holder["x"] = flat.pop(FEATURES)
        return loss_fn(unflatten_dict({**body, **flat}), batch)

    return head_loss, feed


def stage_one(model, loss_fn, plan: exchange.Plan, params, batch):
    """Stage 1 on ``batch``: ``(metrics, head gradients, factors, d_features, body_vjp)``. ``loss_fn(params,
    batch) -> (loss, metrics)``; head gradients: a flat dict of the head's parameters but the factored kernels;
    ``body_vjp(d_features)`` -> (the body's gradients as a flat dict,)."""
    cut, head_keys = split(model, params, batch["image"])
    flat = flatten_dict(params)
    body = {k: v for k, v in flat.items() if k not in head_keys}
    head = {k: v for k, v in flat.items() if k in head_keys}
    feats, body_vjp = jax.vjp(lambda b: _features(model, unflatten_dict({**b, **head}), batch["image"], cut), body)

    def make(b):
        return _head_loss(loss_fn, b, cut, batch)

    head_tree = unflatten_dict({**head, FEATURES: feats})
    _check_tail(make, body, head_tree)
    head_loss, feed = make(body)
    with nn.intercept_methods(feed):
        metrics, grads, factors = exchange.gradients_and_factors(plan, head_loss, head_tree)
    d_feats = grads.pop(FEATURES)
    return metrics, grads, factors, d_feats, body_vjp


def _check_tail(make, body, head_tree):
    """Raises unless the head's loss uses none of the body's parameters (found in its jaxpr)."""

    def loss_of(b, h):
        head_loss, feed = make(b)
        with nn.intercept_methods(feed):
            return head_loss(h)[0]

    jaxpr = jax.make_jaxpr(loss_of)(body, head_tree)
    _, used = pe.dce_jaxpr(jaxpr.jaxpr, [True])
    keys = [path[0].key for path, _ in jax.tree_util.tree_leaves_with_path(body)]  # jax's order of ``body``
    uses = ["/".join(k) for k, u in zip(keys, used[: len(keys)]) if u]
    if uses:
        raise ValueError(
            f"train.overlap=True needs the dense layers at the end of the model, fed only by the "
            f"features before the first of them; the head also uses {uses}"
        )


def exchange_overlapped(
    plan: exchange.Plan,
    exchanger,
    head: dict,
    d_feats,
    body_vjp,
    body_extra: dict | None,
    factors: dict,
    sums: dict,
    allreduce=None,
    allgather=None,
):
    """Stage 2 with the head's sum in flight: start it, run the body's backward pass (adding ``body_extra``, the
    earlier micro-batches' body gradients), then the usual exchange of the rest and the head's sum. Returns the
    mean gradients over ranks (a flat dict with every parameter) and the summed ``sums``."""
    leaves, treedef = jax.tree_util.tree_flatten(head)
    ticket, d_feats = exchanger.start(leaves, d_feats)  # stage 2 takes d_features from the start: it runs after it
    (body,) = body_vjp(d_feats)
    if body_extra:
        body = {k: v + body_extra[k] for k, v in body.items()}
    mean, sums = exchange.exchange_exact(plan, body, factors, sums, allreduce, allgather)
    # the finish takes the body's gradients as an operand: its wait comes after stage 2
    total = treedef.unflatten(exchanger.finish(ticket, leaves, body))
    return {**mean, **{k: v / plan.ranks for k, v in total.items()}}, sums
