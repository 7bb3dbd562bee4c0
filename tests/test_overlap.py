"""``train.overlap``: the two-stage backward with the head's sum in flight (mcnn_jax.parallel.overlap,
mcnn_jax.parallel.nonblocking),
in one process (the exchanger's thread returns the copy). Two ranks: tests/test_comm.py (tests/mpi_comm.py)."""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err

from mcnn_jax.model.mcnn import MCNN, Branch, init_params
from mcnn_jax.parallel import exchange, overlap
from mcnn_jax.parallel.nonblocking import Exchanger
from mcnn_jax.step import create_state, loss_and_metrics, make_train_step

MODEL = MCNN(num_classes=3, widths=(2, 2, 2, 4, 4, 4, 4), merge_width=40, head_width=24, impl="xla")


@pytest.fixture(scope="module")
def setup():
    params = init_params(MODEL, jax.random.key(0), (128, 128, 3))
    rng = np.random.default_rng(0)
    batch = dict(image=rng.random((6, 128, 128, 3), dtype=np.float32), label=np.arange(6).astype(np.int32) % 3)
    return params, batch


def _train(params, batch, plan, microbatch, exchanger, steps=3):
    tx = optax.sgd(0.5, momentum=0.9, nesterov=True)
    step = make_train_step(MODEL, tx, 3, 0.1, plan=plan, microbatch=microbatch, exchanger=exchanger)
    state = create_state(jax.tree_util.tree_map(jnp.array, params), tx, 0, plan)
    for _ in range(steps):
        state, metrics = step(state, batch)
    return state, metrics


@pytest.mark.parametrize(
    "scheme,microbatch", [("auto", 0), ("allreduce", 2), ("factored", 0), ("factored", 3), ("auto", 2)]
)
def test_the_overlapped_step_gives_the_plain_steps_parameters(setup, scheme, microbatch):
    params, batch = setup
    plan = exchange.make_plan(scheme, params, 6, 1)
    exchanger = Exchanger()
    plain, m0 = _train(params, batch, plan, microbatch, None)
    over, m1 = _train(params, batch, plan, microbatch, exchanger)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(over.params), jax.tree_util.tree_leaves(plain.params)):
        assert rel_err(a, b) < 1e-5, jax.tree_util.keystr(path)
    assert rel_err(plain.params["hidden"]["kernel"], params["hidden"]["kernel"]) > 1e-3  # it moved
    assert float(m1["count"]) == 6 and abs(float(m1["loss_sum"]) - float(m0["loss_sum"])) < 1e-4
    assert _per_ticket(exchanger) == [0, 1, 2]  # one start and one finish per step
    exchanger.close()


def _per_ticket(exchanger) -> list:
    """The tickets, each checked to have a start first, then its sum done and its finish (in either order)."""
    kinds = {}
    for kind, ticket, _ in exchanger.events:
        kinds.setdefault(ticket, []).append(kind)
    for ticket, ks in kinds.items():
        assert ks[0] == "start" and sorted(ks[1:]) == ["finish", "summed"], (ticket, ks)
    return sorted(kinds)


def test_the_body_runs_once(setup):
    """The head's pass traces the body's forward too, unused: XLA must drop it (as many convolutions as the plain
    step)."""
    params, batch = setup
    plan = exchange.make_plan("auto", params, 6, 1)
    tx = optax.sgd(0.1)
    state = create_state(params, tx, 0, plan)
    texts = {}
    for name, ex in (("plain", None), ("overlap", Exchanger())):
        lowered = make_train_step(MODEL, tx, 3, plan=plan, exchanger=ex).lower(state, batch)
        texts[name] = (lowered.as_text(), lowered.compile().as_text())
    count = {name: t[1].count(" convolution(") for name, t in texts.items()}
    assert count["plain"] > 0 and count["overlap"] == count["plain"], count
    assert texts["overlap"][1].count("xla_ffi_python_cpu_callback") == 2  # start and finish


def _marker(times):
    """An identity whose backward pass records when it runs (a host callback on the cotangent)."""

    @jax.custom_vjp
    def mark(x):
        return x

    def record(ct):
        times.append(time.perf_counter())
        return ct

    def bwd(_, ct):
        return (jax.pure_callback(record, jax.ShapeDtypeStruct(ct.shape, ct.dtype), ct),)

    mark.defvjp(lambda x: (x, None), bwd)
    return mark


def test_start_comes_before_the_branches_backward_pass_and_finish_after_it(setup):
    params, batch = setup
    plan = exchange.make_plan("auto", params, 6, 1)
    exchanger = Exchanger(delay=0.2)
    stage2 = []
    mark = _marker(stage2)

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        return mark(y) if isinstance(context.module, Branch) and context.method_name == "__call__" else y

    tx = optax.sgd(0.1)
    step = make_train_step(MODEL, tx, 3, plan=plan, exchanger=exchanger)
    with nn.intercept_methods(interceptor):  # active while the step is traced
        state, _ = step(create_state(jax.tree_util.tree_map(jnp.array, params), tx, 0, plan), batch)
    jax.block_until_ready(state)
    at = {kind: t for kind, _, t in exchanger.events}
    assert len(stage2) == 7  # one per branch
    assert at["start"] < min(stage2) and max(stage2) < at["finish"], (at, stage2)
    assert at["summed"] - at["start"] >= 0.2  # the background thread's stand-in for the network
    exchanger.close()


def test_the_exchanger_sums_in_the_background():
    ex = Exchanger(reduce=lambda b: 3 * b, delay=0.05)

    def f(x):
        ticket, y = ex.start([x, x[:2].reshape(1, 2)], 2 * x)
        a, b = ex.finish(ticket, [x, x[:2].reshape(1, 2)], y)
        assert b.shape == (1, 2)
        return a + y + jnp.pad(b[0], (0, 3))

    f = jax.jit(f)
    x = jnp.arange(5.0)
    first = f(x)
    np.testing.assert_allclose(f(x + 1), 5 * np.arange(1.0, 6.0) + [3, 6, 0, 0, 0])
    # the host buffer is reused by the second call: the first result must be XLA's own copy
    np.testing.assert_allclose(first, 5 * np.arange(5.0) + [0, 3, 0, 0, 0])
    assert _per_ticket(ex) == [0, 1]
    with pytest.raises(RuntimeError, match="never started"):
        ex._finish(np.int32(7), [(5,)])
    ex.close()


def test_overlap_rejects_powersgd_and_a_head_that_is_not_the_tail(setup):
    params, batch = setup
    with pytest.raises(ValueError, match="train.overlap=True supports the exact exchanges"):
        make_train_step(
            MODEL, optax.sgd(0.1), 3, plan=exchange.make_plan("powersgd", params, 6, 1), exchanger=Exchanger()
        )

    class Scaled(nn.Module):  # a dense layer, then a parameter that is not a dense layer's
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(3, name="dense")(x.reshape(x.shape[0], -1)[:, :8])
            return x * self.param("scale", nn.initializers.ones, (3,))

    model = Scaled()
    p = model.init(jax.random.key(0), batch["image"][:1])["params"]
    assert overlap.split(model, p, batch["image"])[0] == ("dense",)

    def loss_fn(q, mb):
        loss, metrics, _ = loss_and_metrics(model, q, mb, 3, 0.0)
        return loss, metrics

    with pytest.raises(ValueError, match="the head also uses \\['scale'\\]"):
        overlap.stage_one(model, loss_fn, exchange.make_plan("allreduce", p, 6, 1), p, batch)
