"""The multi-scale CNN (M-CNN) of Godinez et al., Bioinformatics 2017, in Flax.

Seven branches look at the same full-resolution field of view at seven scales. Branch k max-pools the raw
image by ``pool_factors[k]`` (kernel = stride), applies ``convs_per_branch`` KxK convolutions (stride 1,
SAME, bias, ReLU) of width ``widths[k]`` and max-pools by ``post_pools[k]`` so that every branch ends at
H/D x W/D, where D = pool_factor x post_pool is the same for all branches (64 in the published model). The
branches are concatenated, merged by a 1x1 convolution + ReLU, max-pooled by ``merge_pool`` and classified by
a dense hidden layer + ReLU and a dense output layer.

Pure ``init`` / ``apply``: import it in a notebook with ``from mcnn_jax import MCNN``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcnn_jax.model.layers import IMPLS, Conv, max_pool
from mcnn_jax.model.stream import check_stream, streamed_branch

PUBLISHED_POOL_FACTORS = (1, 2, 4, 8, 16, 32, 64)
PUBLISHED_WIDTHS = (16, 16, 16, 32, 32, 32, 64)
PUBLISHED_POST_POOLS = (64, 32, 16, 8, 4, 2, 1)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
HEADS = ("flatten", "global_max", "global_avg")


def check_architecture(pool_factors, widths, post_pools) -> int:
    """Checks the branch description and returns D, the common downsampling of every branch."""
    if not (len(pool_factors) == len(widths) == len(post_pools)) or not pool_factors:
        raise ValueError(
            f"pool_factors, widths and post_pools must be non-empty and of one length; got "
            f"{len(pool_factors)}, {len(widths)} and {len(post_pools)}"
        )
    totals = {f * p for f, p in zip(pool_factors, post_pools)}
    if len(totals) != 1:
        raise ValueError(
            "every branch must end at the same resolution: pool_factor x post_pool differs between "
            f"branches ({list(zip(pool_factors, post_pools))})"
        )
    return totals.pop()


def check_input_size(height: int, width: int, total_pool: int = 64, merge_pool: int = 2) -> None:
    """Raises ValueError unless H and W are multiples of total_pool x merge_pool (128 for the published model)."""
    m = total_pool * merge_pool
    if height <= 0 or width <= 0 or height % m or width % m:
        raise ValueError(
            f"M-CNN cannot take a {height}x{width} input: height and width must both be positive multiples "
            f"of {m} (the branches' common pooling {total_pool} x the merge pool {merge_pool}); sizes that "
            f"work include {m}x{m}, {4 * m}x{5 * m} and {8 * m}x{10 * m}"
        )


class Branch(nn.Module):
    """One scale: max-pool by ``pool``, ``num_convs`` KxK convs of width ``width``, max-pool by ``post_pool``."""

    pool: int
    width: int
    post_pool: int
    num_convs: int = 3
    kernel_size: int = 5
    norm: str = "none"
    norm_groups: int = 8
    dtype: Any = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        x = max_pool(x, self.pool, self.impl)
        fused = self.norm == "none"  # conv + bias + ReLU in one layer (one pass of the native kernels)
        for j in range(self.num_convs):
            x = Conv(self.width, self.kernel_size, dtype=self.dtype, impl=self.impl, relu=fused, name=f"conv{j}")(x)
            if self.norm == "group":
                x = nn.relu(
                    nn.GroupNorm(num_groups=min(self.norm_groups, self.width), dtype=self.dtype, name=f"norm{j}")(x)
                )
        return max_pool(x, self.post_pool, self.impl)


class MCNN(nn.Module):
    """The M-CNN. ``MCNN(num_classes=13)`` at 1024x1280x3 has 42,577,261 parameters.

    Input: NHWC float (any float dtype; it is cast to ``dtype``). Output: float32 logits [N, num_classes] (float64 if
    ``dtype`` is float64, as the finite-difference tests use).
    """

    num_classes: int = 13
    pool_factors: Sequence[int] = PUBLISHED_POOL_FACTORS
    widths: Sequence[int] = PUBLISHED_WIDTHS
    post_pools: Sequence[int] = PUBLISHED_POST_POOLS
    convs_per_branch: int = 3
    kernel_size: int = 5
    merge_width: int = 1024
    merge_pool: int = 2
    head_width: int = 512
    norm: str = "none"  # "none" or "group"
    norm_groups: int = 8
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    remat: Sequence[bool] | bool = False  # rematerialise (recompute in the backward pass) per branch
    # "native" (C++ kernels, mcnn_jax.model.native, falling back to "fast" where they do not apply), "fast"
    # (XLA with faster gradients) or "xla" (plain): the same function and parameters (mcnn_jax.model.layers)
    impl: str = "native"
    # the head on the merged, merge-pooled map: "flatten" (published: every cell into the dense hidden layer, whose
    # size grows with the field), "global_max" or "global_avg" (pooled over the field: any field size)
    head: str = "flatten"
    # exact streaming (mcnn_jax.model.stream): the first ``stream_branches`` branches (-1: all) computed in tiles
    # of ``stream_tile`` x ``stream_tile`` input pixels (a multiple of the common pooling; 0 = off)
    stream_tile: int = 0
    stream_branches: int = 3

    @nn.compact
    def __call__(self, x):
        total = check_architecture(self.pool_factors, self.widths, self.post_pools)
        if x.ndim != 4:
            raise ValueError(f"M-CNN takes NHWC images [batch, height, width, channels]; got shape {x.shape}")
        check_input_size(x.shape[1], x.shape[2], total, self.merge_pool)
        if self.norm not in ("none", "group"):
            raise ValueError(f"norm must be 'none' or 'group', got {self.norm!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.head not in HEADS:
            raise ValueError(f"model.head must be one of {HEADS}, got {self.head!r}")
        streamed = self.streamed_branches()
        if self.stream_tile:  # checked even where no branch streams (stream_branches=0), so a bad tile never waits
            check_stream(self.stream_tile, x.shape[1], x.shape[2], total, self.norm)
        dtype = _DTYPES[self.dtype] if isinstance(self.dtype, str) else self.dtype
        remat = self.remat if isinstance(self.remat, (list, tuple)) else [bool(self.remat)] * len(self.widths)
        if len(remat) != len(self.widths):
            raise ValueError(f"remat needs one flag per branch ({len(self.widths)}), got {len(remat)}")
        x = x.astype(dtype)
        outs = []
        for k, (f, w, p) in enumerate(zip(self.pool_factors, self.widths, self.post_pools)):
            if streamed[k]:  # recomputed tile by tile in the backward pass: remat is implied
                outs.append(
                    streamed_branch(
                        x,
                        name=f"branch{k}",
                        pool=f,
                        width=w,
                        post_pool=p,
                        tile=self.stream_tile,
                        num_convs=self.convs_per_branch,
                        kernel_size=self.kernel_size,
                        dtype=dtype,
                        impl=self.impl,
                    )
                )
                continue
            cls = nn.remat(Branch) if remat[k] else Branch
            outs.append(
                cls(
                    pool=f,
                    width=w,
                    post_pool=p,
                    num_convs=self.convs_per_branch,
                    kernel_size=self.kernel_size,
                    norm=self.norm,
                    norm_groups=self.norm_groups,
                    dtype=dtype,
                    impl=self.impl,
                    name=f"branch{k}",
                )(x)
            )
        x = jnp.concatenate(outs, axis=-1)
        x = nn.Conv(
            self.merge_width,
            (1, 1),
            dtype=dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.zeros,
            name="merge",
        )(x)
        x = nn.relu(x)
        x = max_pool(x, self.merge_pool, self.impl)
        if self.head == "flatten":
            x = x.reshape((x.shape[0], -1))
        else:
            x = x.max(axis=(1, 2)) if self.head == "global_max" else x.mean(axis=(1, 2))
        x = nn.Dense(
            self.head_width,
            dtype=dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.zeros,
            name="hidden",
        )(x)
        x = nn.relu(x)
        x = nn.Dense(
            self.num_classes,
            dtype=dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.zeros,
            name="logits",
        )(x)
        return x.astype(jnp.promote_types(dtype, jnp.float32))  # float32 (float64 for a float64 model)

    def streamed_branches(self) -> list[bool]:
        """Which branches are computed tile by tile (``stream_tile`` and ``stream_branches``)."""
        n = len(self.widths)
        if self.stream_branches < -1 or self.stream_branches > n:
            raise ValueError(f"model.stream_branches must be -1 (all) or 0..{n}, got {self.stream_branches}")
        count = n if self.stream_branches == -1 else self.stream_branches
        return [self.stream_tile != 0 and k < count for k in range(n)]


# the config's model keys: MCNN's own fields (not Flax's parent / name), so a new field needs no edit here
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(MCNN) if f.name not in ("parent", "name"))


def from_config(model_config, num_classes: int | None = None) -> MCNN:
    """Builds an MCNN from a config's ``model`` section (a ConfigDict or a mapping)."""
    cfg = dict(model_config)
    kwargs = {k: cfg[k] for k in MODEL_KEYS if k in cfg}
    for k in ("pool_factors", "widths", "post_pools"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    if isinstance(kwargs.get("remat"), list):
        kwargs["remat"] = tuple(kwargs["remat"])
    if isinstance(kwargs.get("dtype"), str):
        if kwargs["dtype"] not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {kwargs['dtype']!r}")
        kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return MCNN(**kwargs)


def check_model(model: MCNN, input_shape) -> None:
    """Raises the ValueError (naming the config key) that ``model.init`` would raise on NHWC inputs of
    ``input_shape`` (H, W, C): sizes, head, streaming. Traces shapes only: nothing is computed or allocated, so the
    trainer checks a config before it prepares any data."""
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape), jnp.float32)))


def init_params(model: MCNN, rng, input_shape=(1024, 1280, 3)):
    """Initialises the parameters for NHWC inputs of ``input_shape`` (H, W, C); jitted, so XLA drops the
    forward computation that only ``init`` needs to trace."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.jit(lambda r: model.init(r, jnp.zeros(x.shape, x.dtype)))(rng)["params"]


def count_params(params) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
