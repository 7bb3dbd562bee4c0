"""The gradient noise scale: how large a global batch can grow before it stops paying (McCandlish et al., "An
Empirical Model of Large-Batch Training", 2018).

``B_simple = tr(Sigma) / |G|^2``, with ``G`` the full-data gradient of the training loss and ``Sigma`` the
per-image gradient covariance. A batch much smaller than ``B_simple`` is noise-dominated: doubling it (with the
learning rate) halves the number of updates an epoch needs, so scaling out keeps its accuracy at the same epochs.
A batch much larger than it is curvature-dominated: each update does little more than one of ``B_simple``
images, so at the same epochs it makes less progress. ``B_simple`` grows as the loss falls, so it is measured on
checkpoints along a run.

Estimated from the gradients of ``K`` disjoint chunks of ``b`` images each (no per-image gradients needed, so the
model's fused kernels run as in training): with ``g_j`` the chunk means and ``g`` their mean,

    tr(Sigma) = b * sum_j |g_j - g|^2 / (K - 1)         (unbiased: each chunk mean has covariance Sigma / b)
    |G|^2     = |g|^2 - tr(Sigma) / (K b)               (unbiased: E|g|^2 = |G|^2 + tr(Sigma) / (K b))

(McCandlish et al., appendix A, with the two batch sizes ``b`` and ``K b``). Sums are kept in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mcnn_jax.step import loss_and_metrics


def chunk_gradient_fn(model, num_classes: int, label_smoothing: float = 0.0):
    """``(params, batch) -> flat float32 gradient`` of the batch's mean training loss (jitted)."""

    def flat_grad(params, batch):
        grads = jax.grad(lambda p: loss_and_metrics(model, p, batch, num_classes, label_smoothing)[0])(params)
        return jnp.concatenate([g.reshape(-1).astype(jnp.float32) for g in jax.tree_util.tree_leaves(grads)])

    return jax.jit(flat_grad)


def chunk_moments(chunk_grads) -> tuple[np.ndarray | None, float, int]:
    """(sum of the chunk gradients, sum of their squared norms, number of chunks), in float64, from an iterable of
    1-D arrays read once."""
    total, squares, k = None, 0.0, 0
    for g in chunk_grads:
        g = np.asarray(g, dtype=np.float64)
        total = g.copy() if total is None else total + g
        squares += float(g @ g)
        k += 1
    return total, squares, k


def noise_scale(total, squares: float, chunks: int, chunk_size: int) -> dict:
    """``B_simple`` and its parts from ``chunk_moments`` of ``chunks >= 2`` disjoint chunks of ``chunk_size``
    images (the formulas of the module docstring)."""
    k, b = int(chunks), int(chunk_size)
    if k < 2:
        raise ValueError(f"the gradient noise scale needs at least 2 chunks of {b} images; got {k}")
    mean = np.asarray(total, dtype=np.float64) / k
    mean_sq = float(mean @ mean)
    trace = b * (squares - k * mean_sq) / (k - 1)
    grad_sq = mean_sq - trace / (k * b)
    return dict(
        b_simple=trace / grad_sq if grad_sq > 0 else float("inf"),
        trace_sigma=trace,
        grad_norm_sq=grad_sq,
        grad_norm_sq_biased=mean_sq,
        chunks=k,
        chunk_size=b,
        images=k * b,
    )


def gradient_noise_scale(model, params, batches, num_classes: int, label_smoothing: float = 0.0) -> dict:
    """``B_simple`` of ``params`` on ``batches`` (an iterable of batch dicts ``image``, ``label``, optional
    ``mask``, all of one size ``b``, each a chunk of distinct images), with the training loss (``label_smoothing``
    as in training). A batch with padded images (mask 0: the end of a pass) is left out, so that every chunk holds
    exactly ``b`` images; ``skipped_batches`` says how many were. ``b_simple`` is ``inf`` when the estimate of
    ``|G|^2`` is not positive (the gradient is lost in its noise: any batch is small)."""
    grad = chunk_gradient_fn(model, num_classes, label_smoothing)
    seen = dict(size=None, skipped=0)

    def chunks():
        for i, batch in enumerate(batches):
            mask = batch.get("mask")
            if mask is not None and not np.all(np.asarray(mask) > 0):
                seen["skipped"] += 1
                continue
            b = int(np.shape(batch["label"])[0])
            if seen["size"] not in (None, b):
                raise ValueError(
                    f"batch {i} holds {b} images, the batches before it {seen['size']}: every chunk "
                    f"must hold the same number of images"
                )
            seen["size"] = b
            yield grad(params, {k: v for k, v in batch.items() if k != "mask"})

    total, squares, k = chunk_moments(chunks())
    if k == 0:
        raise ValueError("no complete batch to measure the gradient noise scale on")
    return dict(noise_scale(total, squares, k, seen["size"]), skipped_batches=seen["skipped"])
