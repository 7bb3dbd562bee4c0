"""The peak memory per rank that a training config will take, known before it runs.

    from mcnn_jax.memory import estimate, describe
    print(describe(estimate(config)))        # or: mcnn-train --config ... --dry-run

``estimate`` compiles (without running or allocating) the config's own train and evaluation steps for its
image size, local batch, micro-batch, stream tile, head, optimizer and exchange, and reads XLA's buffer
assignment: parameters, optimizer state, the batch, the activations kept for the backward pass and every
temporary. To that it adds the data pipeline's batches in flight, the trainer's readers and checkpoints, and the
process's own baseline (Python, JAX and the libraries), so the total is the resident memory to expect
(benchmarks/stream_memory.py compares the baseline and the train step with a bare step's measured peak,
benchmarks/stream_training.py the whole with mcnn-train's). A config that cannot fit can be estimated all the same:
nothing is allocated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from mcnn_jax import optim
from mcnn_jax.evaluation.forward import outputs_fn
from mcnn_jax.model.mcnn import from_config
from mcnn_jax.parallel import exchange
from mcnn_jax.step import create_state, make_train_step

# resident memory of a training process beyond its compiled programs' buffers: the interpreter, JAX, XLA and the
# libraries once started (0.25 GB measured: benchmarks/stream_memory.py's "baseline_gb"), and XLA's own working
# memory for compiling and running the steps (a further 0.27-0.39 GB measured there, at every field size and tile)
BASELINE_BYTES = 550 * 2**20
# what mcnn-train holds beyond a bare train step: its own libraries (0.11 GB), the readers' threads, buffers and
# caches, checkpoint writes (0.47 and 0.68 GB measured beyond the other parts in mcnn-train runs of configs/montage.py,
# unstreamed and streamed: benchmarks/stream_training.py)
TRAINER_BYTES = 512 * 2**20


def _bytes(tree) -> int:
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def _peak(compiled) -> int:
    """Bytes live while a compiled program runs: arguments, outputs and temporaries, less the donated arguments
    that the outputs reuse."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def estimate(config, num_classes: int | None = None, ranks: int = 1) -> dict:
    """Expected peak resident memory (bytes) of one of ``ranks`` MPI ranks training ``config``, with its parts.

    The image size is ``config.model.input_shape`` and the number of classes ``num_classes`` (default: the
    config's ``model.num_classes``); the local batch is ``train.global_batch / ranks``."""
    h, w, c = tuple(config.model.input_shape)
    gb = config.train.global_batch
    if gb % ranks:
        raise ValueError(f"train.global_batch={gb} is not divisible by the {ranks} MPI ranks")
    local = gb // ranks
    num_classes = num_classes or config.model.num_classes
    model = from_config(config.model, num_classes=num_classes)
    image = jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image.shape, image.dtype))["params"])
    tx = optim.make_optimizer(config.optim, optax.constant_schedule(1.0))
    plan = exchange.make_plan(config.train.comm, params, local, ranks, config.train.powersgd_rank)
    state = jax.eval_shape(lambda p: create_state(p, tx, 0, plan), params)
    step = make_train_step(
        model,
        tx,
        num_classes,
        config.optim.label_smoothing,
        num_ranks=ranks,
        microbatch=config.train.microbatch,
        plan=plan,
        # stand-ins with the real exchange's buffers (one packed sum, one gather of the factors)
        allreduce=(lambda x: x) if ranks > 1 else None,
        allgather=(lambda x: jnp.stack([x] * ranks)) if ranks > 1 else None,
    )
    batch = dict(
        image=jax.ShapeDtypeStruct((local, h, w, c), jnp.float32), label=jax.ShapeDtypeStruct((local,), jnp.int32)
    )
    train = _peak(step.lower(state, batch).compile())
    eval_batch = config.train.eval_batch or config.train.microbatch or local
    images = jax.ShapeDtypeStruct((eval_batch, h, w, c), jnp.float32)
    # evaluation runs between steps: the optimizer state stays resident beside the forward pass (whose arguments
    # hold the parameters)
    evaluate = _bytes(state) - _bytes(params) + _peak(outputs_fn(model).lower([params], images).compile())
    data = (config.data.prefetch + 1) * local * h * w * c * 4  # float32 batches in flight and in use
    parts = dict(
        parameters=_bytes(params),
        optimizer_state=_bytes(state.opt_state),
        train_step=train,
        eval_step=evaluate,
        data_pipeline=data,
        baseline=BASELINE_BYTES,
        trainer=TRAINER_BYTES,
    )
    return dict(
        image=[h, w, c],
        local_batch=local,
        microbatch=config.train.microbatch,
        stream_tile=config.model.stream_tile,
        stream_branches=config.model.stream_branches,
        head=config.model.head,
        bytes=parts,
        peak_bytes=BASELINE_BYTES + TRAINER_BYTES + data + max(train, evaluate),
    )


def describe(est: dict) -> str:
    """A few lines for people: the peak and what it is made of, in GB."""
    gb = 1e9
    p = est["bytes"]
    h, w, c = est["image"]
    stream = f"stream tile {est['stream_tile']}" if est["stream_tile"] else "no streaming"
    lines = [
        f"expected peak memory per rank: {est['peak_bytes'] / gb:.2f} GB "
        f"({h}x{w}x{c}, local batch {est['local_batch']}, micro-batch {est['microbatch'] or 'off'}, {stream}, "
        f"head {est['head']})",
        f"  train step {p['train_step'] / gb:.2f} GB (parameters {p['parameters'] / gb:.2f}, optimizer state "
        f"{p['optimizer_state'] / gb:.2f}, the rest activations, gradients and temporaries)",
        f"  evaluation {p['eval_step'] / gb:.2f} GB, data pipeline {p['data_pipeline'] / gb:.2f} GB, "
        f"process baseline {p['baseline'] / gb:.2f} GB, readers and checkpoints {p['trainer'] / gb:.2f} GB",
    ]
    return "\n".join(lines)
