"""The one forward pass of a trained M-CNN over a store, used by evaluation (``evaluate.Evaluator``, during training
and by ``mcnn-eval``), embeddings and predictions (``embed``) and LOCO: class log-probabilities (an ensemble: the log
of the mean of its members' probabilities) and features of a layer, batch by batch.

    from mcnn_jax.evaluation.forward import features, iter_outputs
    f = features(model, params, images)                  # [N, head_width]: the hidden layer after its ReLU
    for indices, log_probs, feats in iter_outputs(model, params, store, range(store.num_images)): ...

Layers: ``hidden`` is the dense hidden layer after its ReLU; ``merge`` is the 1x1 merge convolution after its ReLU
and max-pool, averaged over its spatial grid (``embed``'s module docstring says more).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mcnn_jax.data import Reader
from mcnn_jax.evaluation.run import EVAL_BATCH, as_members
from mcnn_jax.step import mean_log_probs

LAYERS = ("hidden", "merge")


def _pool_merge(merge, model):
    x = jax.nn.relu(merge)
    f = model.merge_pool
    n, h, w, c = x.shape
    x = x.reshape(n, h // f, f, w // f, f, c).max(axis=(2, 4))  # the model's merge max-pool (kernel = stride)
    return x.mean(axis=(1, 2))


@functools.lru_cache(maxsize=16)
def outputs_fn(model, layer: str = "hidden"):
    """A jitted ``(members, images) -> (log-probabilities, features)`` for ``layer``, one forward pass of each
    member (``members``: a list of parameter trees): the log of the mean of the members' class probabilities
    (``step.mean_log_probs``) and the members' features side by side, [N, members x width]."""
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")

    def member(params, images):
        logits, state = model.apply(
            {"params": params},
            images,
            mutable=["intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == layer,
        )
        out = state["intermediates"][layer]["__call__"][0].astype(jnp.float32)
        return logits, (jax.nn.relu(out) if layer == "hidden" else _pool_merge(out, model))

    def fn(members, images):
        logits, feats = zip(*[member(p, images) for p in members])
        return mean_log_probs(jnp.stack(logits)), jnp.concatenate(feats, axis=-1)

    return jax.jit(fn)


def features(model, params, images, layer: str = "hidden") -> np.ndarray:
    """The ``layer`` features (see the module docstring) of images float32 [N, H, W, C] in [0, 1] (an ensemble,
    a list of parameter trees: its members' features side by side)."""
    return np.asarray(outputs_fn(model, layer)(as_members(params), jnp.asarray(images, jnp.float32))[1])


def reader_outputs(model, params, reader, layer: str = "hidden"):
    """The one forward pass over a store: yields (positions, log-probabilities, features) per batch of ``reader``
    (positions: into ``reader.indices``; padding and other ranks' images left out), through ``outputs_fn``
    (``params``: one parameter tree or an ensemble's list of them). The evaluation ``Reader`` keeps the next
    batches in flight while the model runs and zero-pads the last batch to the batch size (one compilation)."""
    fn, members = outputs_fn(model, layer), as_members(params)
    for step, b in reader.iterate():
        keep = b["mask"] > 0
        log_probs, feats = jax.device_get(fn(members, b["image"]))
        yield reader.batch_positions(step)[keep], log_probs[keep], feats[keep]


def iter_outputs(model, params, store, indices, batch: int = EVAL_BATCH, layer: str = "hidden"):
    """``reader_outputs`` over the images ``indices`` of ``store`` on one process: yields (indices,
    log-probabilities, features) per batch. Every table and prediction uses it."""
    indices = np.asarray(indices, np.int64)
    with Reader(store, indices, batch, augment=None, train=False) as reader:
        for positions, log_probs, feats in reader_outputs(model, params, reader, layer):
            yield indices[positions], log_probs, feats


def predict_probabilities(model, params, store, indices, batch: int = EVAL_BATCH) -> np.ndarray:
    """Class probabilities [N, classes] of images ``indices`` (an ensemble: the mean of its members')."""
    return np.concatenate([np.exp(lp) for _, lp, _ in iter_outputs(model, params, store, indices, batch)])
