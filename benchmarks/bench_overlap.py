"""Does XLA's CPU runtime overlap communication with the branches' backward pass (issue 14, 2), blocking and with
``train.overlap``'s non-blocking pair?

    python benchmarks/bench_overlap.py --out overlap.json          # 384x512, batch 1: ~2 min here
    python benchmarks/bench_overlap.py --height 1024 --width 1280  # full resolution (slower)

In the factored step (``train.comm="factored"``) the allgather of the dense layers' inputs X and output
gradients D depends only on the forward pass and the head's backward pass: nothing forces it after the
convolution branches' backward pass, which is most of a step's compute. This is the two-stage backward of the
issue, written as data flow inside the one jitted step (stage 1: the head, whose factors go out; stage 2: the
branches, whose gradients are summed afterwards). Whether the runtime actually runs the communication while the
branches' backward runs is measured here with the communication made artificially slow: one process, the real
``make_train_step`` with a plan that factors every dense layer, and ``allgather`` (or, as the control,
``allreduce``, which needs the branches' gradients and so cannot overlap) replaced by a host callback that
sleeps ``--sleep`` seconds and then returns its input as one rank's gather (or sum). Per variant the median of
``--steps`` steps, alternated:

  base      no sleep
  gather    the sleep in the allgather of the factors (overlappable by the data flow)
  reduce    the sleep in the allreduce (cannot be overlapped: the control)

and, for ``train.overlap`` (``mcnn_jax.parallel.overlap``: the head's summed gradients started by a host callback that
returns at once, summed on a background thread, waited for after the branches' backward pass), with the plan
that sums every gradient (``"allreduce"``, as ``"auto"`` chooses at 128 nodes x 16 images), so that the hidden
layer's 98.5% of the bytes is what travels:

  plain          the same plan without overlap, no sleep
  overlap        train.overlap, the background thread does not sleep (the mechanism's own cost: two copies)
  overlap_sleep  train.overlap, the background thread sleeps ``--sleep`` seconds (the network's stand-in)

``hidden_fraction = 1 - (t_sleep - t_no_sleep) / sleep`` per form (gather: blocking; overlap: non-blocking): 1 if
the sleep were entirely hidden behind the backward pass, 0 if the runtime ran it alone. ``stage2_s``: the median
time from the start callback to the finish callback in the ``overlap`` variant (the branches' backward pass: the
window available to hide the head's sum), also as a fraction of the ``overlap`` step. JSON on stdout (and
``--out``). ``roundtrip_s``: the mechanism's cost measured on its own, less noisy than the difference of two
steps: a jitted start -> finish of a buffer of the head's size (no sleep) less a jitted copy of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def slow(seconds: float, gather: bool):
    """A stand-in for a collective of one rank that takes ``seconds``: a host callback that sleeps."""
    import jax
    import numpy as np

    def host(x):
        time.sleep(seconds)
        return (x[None] if gather else x).astype(np.float32)

    def collective(x):
        shape = (1, *x.shape) if gather else x.shape
        return jax.pure_callback(host, jax.ShapeDtypeStruct(shape, x.dtype), x)

    return collective


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds (default: half the base step, measured)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    times, sleep, stage2, roundtrip = measure(args)
    import jax

    med = {name: statistics.median(ts) for name, ts in times.items()}
    stage2_s = statistics.median(stage2)
    result = dict(
        benchmark="bench_overlap",
        command=" ".join([sys.executable, *sys.argv]),
        image_shape=[args.height, args.width, 3],
        batch=args.batch,
        sleep_s=sleep,
        steps=args.steps,
        jax=jax.__version__,
        loadavg_before=load_before,
        loadavg=os.getloadavg(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        step_s=times,
        median_s=med,
        extra_s=dict(
            gather=med["gather"] - med["base"],
            reduce=med["reduce"] - med["base"],
            overlap_sleep=med["overlap_sleep"] - med["overlap"],
            overlap_mechanism=med["overlap"] - med["plain"],
        ),
        hidden_fraction=dict(
            gather=1 - (med["gather"] - med["base"]) / sleep,
            reduce=1 - (med["reduce"] - med["base"]) / sleep,
            overlap=1 - (med["overlap_sleep"] - med["overlap"]) / sleep,
        ),
        stage2_s=stage2_s,
        stage2_samples_s=stage2,
        stage2_fraction=stage2_s / med["overlap"],
        roundtrip_s=roundtrip,
        head_floats=head_floats(args),
    )
    from bench_train import emit

    emit(result, args.out)


def measure(args):
    """Per variant (base, gather, reduce) the seconds of ``args.steps`` alternated steps, and the sleep."""
    import jax
    import numpy as np
    import optax

    from mcnn_jax.model.mcnn import MCNN, init_params
    from mcnn_jax.parallel import exchange
    from mcnn_jax.parallel.nonblocking import Exchanger
    from mcnn_jax.step import create_state, make_train_step

    model = MCNN(num_classes=13)
    params = init_params(model, jax.random.key(0), (args.height, args.width, 3))
    plan = exchange.make_plan("factored", params, args.batch, 1)
    tx = optax.sgd(1e-4, momentum=0.9, nesterov=True)
    rng = np.random.default_rng(0)
    batch = dict(
        image=rng.random((args.batch, args.height, args.width, 3), dtype=np.float32),
        label=rng.integers(0, 13, args.batch).astype(np.int32),
    )

    summed = exchange.make_plan("allreduce", params, args.batch, 1)
    exchangers = {}

    def build(sleep_gather: float, sleep_reduce: float):
        gather = slow(sleep_gather, True) if sleep_gather else None
        reduce = slow(sleep_reduce, False) if sleep_reduce else None
        return make_train_step(model, tx, 13, plan=plan, allgather=gather, allreduce=reduce)

    def build_overlap(name, delay):
        exchangers[name] = Exchanger(delay=delay) if delay is not None else None
        return make_train_step(model, tx, 13, plan=summed, exchanger=exchangers[name])

    def timed(step, state):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        return state, time.perf_counter() - t0

    state, base = create_state(params, tx, 0, plan), build(0.0, 0.0)
    for _ in range(2):  # compile, warm
        state, t = timed(base, state)
    sleep = args.sleep or round(t / 2, 3)
    variants = dict(
        base=base,
        gather=build(sleep, 0.0),
        reduce=build(0.0, sleep),
        plain=build_overlap("plain", None),
        overlap=build_overlap("overlap", 0.0),
        overlap_sleep=build_overlap("overlap_sleep", sleep),
    )
    for name in list(variants)[1:]:
        state, _ = timed(variants[name], state)  # compile
    times = {name: [] for name in variants}
    for k in range(args.steps):
        for name in list(variants) if k % 2 == 0 else list(variants)[::-1]:
            state, t = timed(variants[name], state)
            times[name].append(t)
    return times, sleep, stage2_seconds(exchangers["overlap"], skip=1), roundtrip_seconds(summed, params)


def roundtrip_seconds(plan, params, reps: int = 4) -> float:
    """Seconds a start -> finish of the head's gradients (the dense layers') costs beyond a jitted copy of them."""
    import jax
    import jax.numpy as jnp

    from mcnn_jax.parallel import exchange
    from mcnn_jax.parallel.nonblocking import Exchanger

    ex = Exchanger()
    shapes = [(la.fan_in, la.fan_out) for la in exchange.dense_layers(params)]
    xs = [jnp.ones(s, jnp.float32) for s in shapes]
    d = jnp.ones((1, shapes[0][0]), jnp.float32)

    def exchange(xs, d):
        ticket, d2 = ex.start([2 * x for x in xs], d)
        return ex.finish(ticket, xs, d2)

    best = {}
    for name, fn in (("exchange", jax.jit(exchange)), ("copy", jax.jit(lambda xs, d: [2 * x for x in xs]))):
        jax.block_until_ready(fn(xs, d))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(xs, d))
            ts.append(time.perf_counter() - t0)
        best[name] = min(ts)
    ex.close()
    return best["exchange"] - best["copy"]


def head_floats(args) -> int:
    """float32 elements of the overlapped head buffer (every dense layer's kernel and bias) at this image size."""
    import jax
    import jax.numpy as jnp

    from mcnn_jax.model.mcnn import MCNN
    from mcnn_jax.parallel import exchange

    shapes = jax.eval_shape(
        lambda: MCNN(num_classes=13).init(jax.random.key(0), jnp.zeros((1, args.height, args.width, 3)))
    )
    return sum(la.fan_out * (la.fan_in + 1) for la in exchange.dense_layers(shapes["params"]))


def stage2_seconds(exchanger, skip: int) -> list:
    """Per ticket (after the first ``skip``, the compiling steps) the seconds from its start to its finish
    callback."""
    at = {}
    for kind, ticket, t in exchanger.events:
        at.setdefault(ticket, {})[kind] = t
    return [v["finish"] - v["start"] for ticket, v in sorted(at.items())[skip:]]


if __name__ == "__main__":
    main()
