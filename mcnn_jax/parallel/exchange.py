"""How a train step exchanges its gradients between MPI ranks (``train.comm``), as pure functions over pytrees.

98.5% of the M-CNN's parameters are in the first dense layer (81920 x 512 at 1024x1280). Four schemes:

- ``"allreduce"``: every gradient is summed by one packed allreduce (GradientFlow's fused "lazy" allreduce).
- ``"factored"``: a dense layer's weight gradient over a batch is exactly ``dW = X^T D`` (X: the layer's inputs
  [b, n_in], D: the loss gradients at its outputs [b, n_out]). Each rank sends its X and D (one packed
  allgather of ``b x (n_in + n_out)`` floats per rank) and every rank computes ``X_all^T D_all`` of the global
  batch: the same mathematics with far less traffic while the global batch stays below ~2 n_in n_out / (n_in +
  n_out) images (~1000 for the hidden layer; "sufficient factor broadcasting", Poseidon, Zhang et al. 2017).
- ``"auto"``: per dense layer, the exact scheme (factored or summed) that sends fewer bytes (``make_plan``).
- ``"powersgd"`` (lossy, opt-in): the dense kernels' gradients are compressed to rank r (PowerSGD, Vogels et
  al. 2019): ``P = M Q`` is summed, orthonormalised, then ``Q = M^T P`` is summed (float32), with error
  feedback (``M`` = gradient + the error the compression left last step) and ``Q`` warm-started from the
  last step (its orthonormal basis). At rank min(n_in, n_out) it is the plain sum, up to rounding. Traffic ``r x (n_in
  + n_out)`` per layer, independent of the number of ranks and of the batch.

How the factored layers' local weight gradients are never computed (``gradients_and_factors``): the loss is
differentiated with respect to every parameter EXCEPT the factored layers' kernels, which enter as constants,
so JAX's autodiff builds no transpose (no ``X^T D`` matmul) for them. A method interceptor
(``flax.linen.intercept_methods``) wraps those layers' ``__call__``: it records the input X and adds a zero
"probe" to the output, whose gradient is D. No change to the model is needed, and the probes' gradients and
the inputs come out of the one ``jax.value_and_grad``. Biases (and every other parameter) are differentiated
as usual and summed. With micro-batches, the factors of all micro-batches are concatenated along the batch
axis before the one allgather (``concat_factors``).

Collectives per step: one packed allreduce (the summed gradients, the metric sums and the stop signal) plus, for
"factored"/"auto", at most one packed allgather (all factored layers' X and D); "powersgd" makes two packed allreduces
(the P's, then the Q's with everything else) and no allgather. With one rank, nothing is sent and the same arithmetic
runs. ``train.overlap`` (``mcnn_jax.parallel.overlap``) moves the summed dense layers' gradients out of the packed
allreduce into a background allreduce that runs during the branches' backward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.flatten_util import ravel_pytree

SCHEMES = ("auto", "allreduce", "factored", "powersgd")
FLOAT = 4  # bytes per float32


# --- the plan: which layer goes how ----------------------------------------------------------------------------
def ring_allreduce_bytes(nbytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring allreduce of ``nbytes`` (reduce-scatter + allgather)."""
    return 2.0 * (ranks - 1) / ranks * nbytes


def ring_allgather_bytes(block_bytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring allgather of a ``block_bytes`` block per rank."""
    return float((ranks - 1) * block_bytes)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A dense layer: its parameter path (e.g. ``("hidden",)``) and kernel shape."""

    path: tuple
    fan_in: int
    fan_out: int

    def allreduce_bytes(self, ranks: int) -> float:
        return ring_allreduce_bytes(FLOAT * self.fan_in * self.fan_out, ranks)

    def factored_bytes(self, local_batch: int, ranks: int) -> float:
        return ring_allgather_bytes(FLOAT * local_batch * (self.fan_in + self.fan_out), ranks)


def dense_layers(params) -> list[Layer]:
    """The dense layers of a parameter tree: modules with a 2-D ``kernel`` and a ``bias`` (flax ``nn.Dense``)."""
    flat = flatten_dict(params)
    return [
        Layer(k[:-1], *v.shape)
        for k, v in flat.items()
        if k[-1] == "kernel" and v.ndim == 2 and k[:-1] + ("bias",) in flat
    ]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The step's exchange: the scheme asked for, and which dense layers are factored or compressed."""

    scheme: str
    ranks: int
    local_batch: int
    num_params: int
    factored: tuple = ()  # Layers exchanged as X and D
    compressed: tuple = ()  # Layers compressed by PowerSGD
    rank: int = 0  # PowerSGD rank

    def layer_rank(self, layer: Layer) -> int:
        return min(self.rank, layer.fan_in, layer.fan_out)

    def sizes(self) -> dict:
        """float32 elements of the packed collectives: the allreduce(s) and this rank's allgather block."""
        fac = sum(self.local_batch * (la.fan_in + la.fan_out) for la in self.factored)
        pq = {la.path: self.layer_rank(la) * (la.fan_in + la.fan_out) for la in self.compressed}
        summed = self.num_params - sum(la.fan_in * la.fan_out for la in self.factored + self.compressed)
        p_only = sum(self.layer_rank(la) * la.fan_in for la in self.compressed)
        return dict(allreduce=summed + sum(pq.values()) - p_only + len(METRIC_SUMS), allreduce_p=p_only, allgather=fac)

    def bytes_sent(self) -> dict:
        """Bytes each rank sends per step (ring collectives), per collective and in total."""
        s = self.sizes()
        out = dict(
            allreduce=ring_allreduce_bytes(FLOAT * s["allreduce"], self.ranks),
            allreduce_p=ring_allreduce_bytes(FLOAT * s["allreduce_p"], self.ranks),
            allgather=ring_allgather_bytes(FLOAT * s["allgather"], self.ranks),
        )
        out["total"] = sum(out.values())
        return out

    def describe(self) -> str:
        parts = [f"{'/'.join(la.path)} factored" for la in self.factored]
        parts += [f"{'/'.join(la.path)} PowerSGD rank {self.layer_rank(la)}" for la in self.compressed]
        mib = self.bytes_sent()["total"] / 2**20
        return (
            f"train.comm={self.scheme!r}: {', '.join(parts) or 'every gradient summed'}; "
            f"{mib:.2f} MiB sent per rank per step over {self.ranks} rank(s)"
        )


METRIC_SUMS = ("correct", "count", "loss_sum", "stop")  # the scalars that ride in the packed allreduce


def make_plan(scheme: str, params, local_batch: int, ranks: int, powersgd_rank: int = 4) -> Plan:
    """Chooses per dense layer. ``"auto"`` factors a layer when its allgather sends strictly fewer bytes than
    summing its kernel gradient (so one rank, where both send nothing, sums)."""
    if scheme not in SCHEMES:
        raise ValueError(f"train.comm must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    if scheme == "powersgd" and powersgd_rank < 1:
        raise ValueError(f"train.powersgd_rank must be >= 1 with train.comm='powersgd'; got {powersgd_rank}")
    layers = dense_layers(params)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    plan = Plan(scheme, ranks, local_batch, n)
    if scheme == "factored":
        return dataclasses.replace(plan, factored=tuple(layers))
    if scheme == "auto":
        cheaper = tuple(la for la in layers if la.factored_bytes(local_batch, ranks) < la.allreduce_bytes(ranks))
        return dataclasses.replace(plan, factored=cheaper)
    if scheme == "powersgd":
        return dataclasses.replace(plan, compressed=tuple(layers), rank=powersgd_rank)
    return plan


# --- local gradients --------------------------------------------------------------------------------------------
def _kernel(layer: Layer) -> tuple:
    return layer.path + ("kernel",)


def gradients_and_factors(plan: Plan, loss_fn: Callable, params):
    """``loss_fn(params) -> (loss, aux)``. Returns ``aux``, the gradients of every parameter except the factored
    kernels (a flat dict keyed by path tuples) and the factors ``{path: (X [b, n_in], D [b, n_out])}``."""
    flat = flatten_dict(params)
    kernels = {_kernel(la): flat[_kernel(la)] for la in plan.factored}
    rest = {k: v for k, v in flat.items() if k not in kernels}
    if not kernels:
        grads, aux = jax.grad(lambda r: loss_fn(unflatten_dict(r)), has_aux=True)(rest)
        return aux, grads, {}
    by_path = {la.path: la for la in plan.factored}

    def loss_of(rest, probes):
        inputs = {}

        def interceptor(next_fun, args, kwargs, context):
            path = tuple(context.module.path)
            if context.method_name != "__call__" or path not in by_path:
                return next_fun(*args, **kwargs)
            x = args[0]
            if x.ndim != 2:
                raise ValueError(f"the factored exchange needs 2-D inputs [batch, features] at {path}; got {x.shape}")
            inputs[path] = x
            y = next_fun(*args, **kwargs)
            return y + probes[path].astype(y.dtype)  # a zero whose gradient is D

        with nn.intercept_methods(interceptor):
            loss, aux = loss_fn(unflatten_dict({**rest, **kernels}))  # the kernels: constants, not differentiated
        return loss, (aux, inputs)

    probes = _probes(loss_fn, params, by_path)
    ((_, (aux, xs)), (grads, ds)) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(rest, probes)
    return aux, grads, {p: (xs[p].astype(jnp.float32), ds[p].astype(jnp.float32)) for p in by_path}


def _probes(loss_fn, params, by_path) -> dict:
    """Zeros the shape of each factored layer's output, found by tracing ``loss_fn`` once (shapes only)."""
    shapes = {}

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and tuple(context.module.path) in by_path:
            shapes[tuple(context.module.path)] = y.shape
        return y

    def run(p):
        with nn.intercept_methods(record):
            return loss_fn(p)

    jax.eval_shape(run, params)
    missing = set(by_path) - set(shapes)
    if missing:
        raise ValueError(f"the dense layers {sorted(missing)} were not called by the model")
    return {p: jnp.zeros(s, jnp.float32) for p, s in shapes.items()}


def concat_factors(factors: list[dict]) -> dict:
    """The factors of several micro-batches as one batch (their X^T D sums the micro-batches' gradients)."""
    return {p: tuple(jnp.concatenate([f[p][i] for f in factors]) for i in (0, 1)) for p in factors[0]}


# --- the exchange -----------------------------------------------------------------------------------------------
def _identity(x):
    return x


def _local_gather(x):
    return x[None]


def exchange_exact(plan: Plan, grads: dict, factors: dict, sums: dict, allreduce=None, allgather=None):
    """The mean gradient over ranks (a flat dict with every parameter) and the summed ``sums``, from one packed
    allreduce of ``grads`` + ``sums`` and one packed allgather of the factors (X_all^T D_all / ranks)."""
    allreduce, allgather = allreduce or _identity, allgather or _local_gather
    kernels = {}
    if factors:  # first in program order (mpi4jax orders its collectives so): the factors are ready first
        block, unravel_f = ravel_pytree(factors)
        parts = jax.vmap(unravel_f)(allgather(block))  # [ranks, block]: every leaf gains a leading ranks axis
        for la in plan.factored:
            x, d = (a.reshape(-1, a.shape[-1]) for a in parts[la.path])
            kernels[_kernel(la)] = (x.T @ d) / plan.ranks
    flat, unravel = ravel_pytree((grads, sums))
    grads, sums = unravel(allreduce(flat))
    return {**{k: v / plan.ranks for k, v in grads.items()}, **kernels}, sums


def powersgd_init(plan: Plan, seed: int = 0) -> dict:
    """PowerSGD's state: per compressed layer a warm-start ``q`` [n_out, r] (the same on every rank) and this
    rank's ``error`` [n_in, n_out]."""
    state = {}
    for i, la in enumerate(plan.compressed):
        q = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (la.fan_out, plan.layer_rank(la)))
        state["/".join(la.path)] = dict(q=q, error=jnp.zeros((la.fan_in, la.fan_out), jnp.float32))
    return state


def _orthonormal(p):
    return jnp.linalg.qr(p)[0]


def exchange_powersgd(plan: Plan, grads: dict, sums: dict, state: dict, allreduce=None):
    """PowerSGD with error feedback: the P's in one packed allreduce, then the Q's with every other gradient and
    the sums in a second. Returns the mean gradient (a flat dict), the sums and the new state."""
    allreduce = allreduce or _identity
    grads = dict(grads)
    m = {"/".join(la.path): grads.pop(_kernel(la)) + state["/".join(la.path)]["error"] for la in plan.compressed}
    p_flat, unravel_p = ravel_pytree({k: m[k] @ s["q"] for k, s in state.items()})
    p_hat = {k: _orthonormal(p) for k, p in unravel_p(allreduce(p_flat)).items()}
    q_local = {k: m[k].T @ p_hat[k] for k in m}
    flat, unravel = ravel_pytree((q_local, grads, sums))
    q_sum, grads, sums = unravel(allreduce(flat))
    out = {k: v / plan.ranks for k, v in grads.items()}
    new_state = {}
    for la in plan.compressed:
        k = "/".join(la.path)
        q = q_sum[k] / plan.ranks
        approx = p_hat[k] @ q.T
        out[_kernel(la)] = approx
        # warm start from Q's orthonormal basis: the same span when Q has full rank (so the same next P-hat),
        # and a full basis when it does not (a gradient of rank < r), which keeps rank min(n_in, n_out) exact
        new_state[k] = dict(q=_orthonormal(q), error=m[k] - approx)
    return out, sums, new_state


def exchange_gradients(
    plan: Plan, grads: dict, factors: dict, sums: dict, comm_state: Any, allreduce=None, allgather=None
):
    """Dispatches to the plan's exchange; returns (mean gradients as a flat dict, summed sums, comm state)."""
    if plan.compressed:
        return exchange_powersgd(plan, grads, sums, comm_state, allreduce)
    out, sums = exchange_exact(plan, grads, factors, sums, allreduce, allgather)
    return out, sums, comm_state
