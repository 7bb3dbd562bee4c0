"""Exact streaming (``model.stream_tile``): the streamed model computes the unstreamed model's logits and gradients,
whatever the tile, on microscopy-like fields and random ones; the global heads; the errors; bounded memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err
from fields import KINDS, field

from mcnn_jax.evaluation.embed import LAYERS, features
from mcnn_jax.model.mcnn import MCNN
from mcnn_jax.model.stream import halo_overhead
from mcnn_jax.step import create_state, make_train_step

THIN = dict(num_classes=4, widths=(2, 2, 2, 4, 4, 4, 4), merge_width=16, head_width=16)
SIZE = 256  # 256x256: tiles of 64 (4x4, smaller than the coarse branches' halo), 128, 192 (last tile shifted), 256


def _fields(dtype):
    """One field of each kind of tests/fields.py (flat, saturated, 12-bit, zero borders, constant channel, random)."""
    return jnp.asarray(np.stack([field(k, SIZE, SIZE, 3, seed=i) for i, k in enumerate(KINDS)]), dtype)


def _perturbed(params, dtype, seed=0):
    """The parameters with every leaf moved, so the biases are nonzero (a leaking bias + ReLU would show)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a + 0.1 * rng.standard_normal(a.shape), dtype), params)


def _logits_and_grads(model, params, x):
    def loss(p, x):  # x an argument: a constant image would be folded by XLA at compile time (slowly)
        logits = model.apply({"params": p}, x)
        labels = jnp.arange(x.shape[0]) % 4
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).sum(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
    return logits, grads


def _init(model, x):
    return jax.jit(model.init)(jax.random.key(0), x[:1])["params"]


def _worst(a, b) -> tuple[float, str]:
    """The largest per-leaf relative error of tree ``a`` against ``b``, and its leaf."""
    errs = [
        (rel_err(x, y), jax.tree_util.keystr(path))
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b))
    ]
    return max(errs)


@pytest.fixture(scope="module")
def float64_reference():
    with jax.enable_x64(True):
        plain = MCNN(**THIN, impl="xla", dtype=jnp.float64)
        x = _fields(jnp.float64)
        params = _perturbed(_init(plain, x), jnp.float64)
        logits, grads = _logits_and_grads(plain, params, x)
        yield params, x, logits, grads


@pytest.mark.parametrize("tile,branches", [(64, -1), (128, 3), (192, -1), (256, 7)])
def test_streamed_equals_the_whole_field_in_float64(float64_reference, tile, branches):
    """Relative 1e-10 on logits and every parameter gradient, per field kind; the parameter tree is the same."""
    params, x, logits0, grads0 = float64_reference
    with jax.enable_x64(True):
        model = MCNN(**THIN, impl="xla", dtype=jnp.float64, stream_tile=tile, stream_branches=branches)
        assert model.streamed_branches() == [k < (7 if branches == -1 else branches) for k in range(7)]
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1])["params"])
        assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
        logits, grads = _logits_and_grads(model, params, x)
    for i, kind in enumerate(KINDS):
        assert rel_err(logits[i], logits0[i]) < 1e-10, kind
    err, leaf = _worst(grads, grads0)
    assert err < 1e-10, (leaf, err)
    assert rel_err(grads0["branch0"]["conv0"]["bias"], 0 * grads0["branch0"]["conv0"]["bias"]) > 0  # not all zero


def test_streamed_equals_the_whole_field_in_float64_on_a_non_square_field():
    """256x384 in tiles of 128 (2 x 3 tiles; a shifted last tile is tested on the square field), relative 1e-10 on
    logits and every parameter gradient."""
    with jax.enable_x64(True):
        x = jnp.asarray(np.stack([field(k, 256, 384, 3, seed=i) for i, k in enumerate(KINDS[:2])]), jnp.float64)
        plain = MCNN(**THIN, impl="xla", dtype=jnp.float64)
        params = _perturbed(_init(plain, x), jnp.float64, seed=4)
        logits0, grads0 = _logits_and_grads(plain, params, x)
        for tile in (128,):
            model = plain.clone(stream_tile=tile, stream_branches=-1)
            logits, grads = _logits_and_grads(model, params, x)
            assert rel_err(logits, logits0) < 1e-10, tile
            err, leaf = _worst(grads, grads0)
            assert err < 1e-10, (tile, leaf, err)


@pytest.mark.parametrize("impl", ["native", "fast", "xla"])
def test_streamed_float32_is_as_close_to_float64_as_float32_xla(float64_reference, impl):
    """Every gradient leaf of the streamed float32 model (tiles of 64: 16 tiles) is within 2x (+1e-6) of plain
    float32 XLA's error against float64, and so are the logits."""
    params64, x64, logits64, grads64 = float64_reference
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params64)
    x = jnp.asarray(x64, jnp.float32)
    logits0, grads0 = _logits_and_grads(MCNN(**THIN, impl="xla"), params, x)
    logits, grads = _logits_and_grads(MCNN(**THIN, impl=impl, stream_tile=64, stream_branches=-1), params, x)
    assert rel_err(logits, logits64) <= 2 * rel_err(logits0, logits64) + 1e-6
    leaves = zip(
        jax.tree_util.tree_leaves_with_path(grads),
        jax.tree_util.tree_leaves(grads0),
        jax.tree_util.tree_leaves(grads64),
    )
    for (path, g), g0, g64 in leaves:
        assert rel_err(g, g64) <= 2 * rel_err(g0, g64) + 1e-6, jax.tree_util.keystr(path)


def test_streamed_train_step_with_micro_batches_equals_the_plain_step():
    """The streamed model in the jitted train step, in micro-batches of 2: the plain step's update (relative 1e-5)."""
    x = jnp.asarray(np.stack([field(k, 128, 256, 3, seed=i) for i, k in enumerate(KINDS[:4])]))
    batch = dict(image=x, label=jnp.array([0, 1, 2, 3]))
    plain, streamed = MCNN(**THIN), MCNN(**THIN, stream_tile=64, stream_branches=3)
    params = _perturbed(_init(plain, x), jnp.float32, seed=1)
    tx = optax.sgd(0.5, momentum=0.9)
    s0, m0 = make_train_step(plain, tx, 4)(create_state(jax.tree_util.tree_map(jnp.array, params), tx, 0), batch)
    s1, m1 = make_train_step(streamed, tx, 4, microbatch=2)(
        create_state(jax.tree_util.tree_map(jnp.array, params), tx, 0), batch
    )
    assert abs(float(m1["loss_sum"]) - float(m0["loss_sum"])) < 1e-4 * abs(float(m0["loss_sum"]))
    err, leaf = _worst(s1.params, s0.params)
    assert err < 1e-5, (leaf, err)
    assert _worst(s0.params, params)[0] > 1e-3  # the step moved the parameters


@pytest.mark.parametrize("scheme,overlapped", [("factored", False), ("powersgd", False), ("factored", True)])
def test_streamed_train_step_with_every_exchange_equals_the_plain_one(scheme, overlapped):
    """train.comm factored / powersgd (rank 2) and train.overlap with the streamed model (every branch in tiles of
    64): two steps give the unstreamed model's parameters with the same exchange (relative 1e-5)."""
    from mcnn_jax.parallel import exchange
    from mcnn_jax.parallel.nonblocking import Exchanger

    x = jnp.asarray(np.stack([field(k, 128, 256, 3, seed=i) for i, k in enumerate(KINDS[:4])]))
    batch = dict(image=x, label=jnp.array([0, 1, 2, 3]))
    plain, streamed = MCNN(**THIN), MCNN(**THIN, stream_tile=64, stream_branches=-1)
    params = _perturbed(_init(plain, x), jnp.float32, seed=3)
    plan = exchange.make_plan(scheme, params, 4, 1, powersgd_rank=2)
    tx = optax.sgd(0.5, momentum=0.9)
    out = []
    for model in (plain, streamed):
        exchanger = Exchanger() if overlapped else None
        step = make_train_step(model, tx, 4, plan=plan, exchanger=exchanger)
        state = create_state(jax.tree_util.tree_map(jnp.array, params), tx, 0, plan)
        for _ in range(2):
            state, _ = step(state, batch)
        out.append(state.params)
        if exchanger is not None:
            exchanger.close()
    err, leaf = _worst(out[1], out[0])
    assert err < 1e-5, (leaf, err)
    assert _worst(out[0], params)[0] > 1e-3  # the steps moved the parameters


def test_streaming_bounds_the_backward_pass_memory():
    """XLA's buffers for a streamed gradient (tiles of 128) grow with the field far less than the unstreamed
    model's: the backward pass keeps the pooled field, not every tile's activations."""

    def temp_bytes(model, size):
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape))["params"])
        loss = jax.grad(lambda p, x: model.apply({"params": p}, x).sum())
        return jax.jit(loss).lower(params, x).compile().memory_analysis().temp_size_in_bytes

    kw = dict(THIN, widths=(16, 16, 16, 4, 4, 4, 4), head="global_max", impl="xla")
    plain = temp_bytes(MCNN(**kw), 1024) / temp_bytes(MCNN(**kw), 512)
    streamed = temp_bytes(MCNN(**kw, stream_tile=128), 1024) / temp_bytes(MCNN(**kw, stream_tile=128), 512)
    assert plain > 3.5 and streamed < 2.0, (plain, streamed)


@pytest.mark.parametrize("head", ["global_max", "global_avg"])
def test_global_heads_take_any_field_size_with_the_same_parameters(head):
    model = MCNN(**THIN, head=head)
    small, large = jnp.asarray(field("flat_saturated", 128, 128)[None]), jnp.asarray(field("random", 256, 384)[None])
    params = _init(model, small)
    assert params["hidden"]["kernel"].shape == (16, 16)
    assert jax.jit(model.apply)({"params": params}, large).shape == (1, 4)
    flat = _init(MCNN(**THIN), large)
    assert flat["hidden"]["kernel"].shape == (2 * 3 * 16, 16)  # flatten: the merged cells of a 256x384 field


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(stream_tile=100), "positive multiple of the branches' common pooling 64"),
        (dict(stream_tile=-64), "model.stream_tile must be 0"),
        (dict(stream_tile=384), "model.stream_tile 384 is larger than the 256x256 field"),
        (dict(stream_tile=64, norm="group"), "needs model.norm='none'"),
        (dict(stream_tile=64, stream_branches=8), "model.stream_branches must be -1"),
        (dict(stream_tile=100, stream_branches=0), "positive multiple of the branches' common pooling 64"),
        (dict(head="avg"), "model.head must be one of"),
    ],
)
def test_bad_streaming_settings_name_the_key(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MCNN(**THIN, **kw).init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)))


def test_embeddings_of_a_streamed_model_are_the_unstreamed_ones():
    """mcnn-embed's features (the merge and hidden layers) read through the streamed branches unchanged."""
    x = np.stack([field(k, 128, 256, 3, seed=i) for i, k in enumerate(KINDS[:2])])
    plain = MCNN(**THIN)
    params = _perturbed(_init(plain, jnp.asarray(x)), jnp.float32, seed=2)
    for layer in LAYERS:
        a = features(MCNN(**THIN, stream_tile=64, stream_branches=-1), params, x, layer)
        np.testing.assert_allclose(a, features(plain, params, x, layer), rtol=1e-5, atol=1e-6)


def test_halo_overhead_counts_each_tiles_halo():
    """Tiles of 128 on a 256x256 field, 3 branches streamed: branch k's 4 tiles of t = 128 / 2^k pooled pixels; its
    first convolution (3 -> w) runs on the tile and a halo of 6 on every side, the second (w -> w) on a halo of 4,
    the third on 2; the other branches as they are."""
    model = MCNN(**THIN, stream_tile=128, stream_branches=3)
    per_pixel = [3 * w + 2 * w * w for w in THIN["widths"]]  # 3 convs: 3 -> w -> w -> w
    pixels = [(256 // f) ** 2 for f in (1, 2, 4, 8, 16, 32, 64)]
    w = THIN["widths"]
    tiles = [
        4 * (3 * w[k] * (t + 12) ** 2 + w[k] ** 2 * ((t + 8) ** 2 + (t + 4) ** 2)) for k, t in enumerate((128, 64, 32))
    ]
    streamed = sum(tiles) + sum(p * n for p, n in zip(per_pixel[3:], pixels[3:]))
    assert halo_overhead(model, 256, 256) == pytest.approx(streamed / sum(p * n for p, n in zip(per_pixel, pixels)))
    assert halo_overhead(MCNN(**THIN), 256, 256) == 1.0


def test_the_trainer_rejects_a_bad_tile_before_it_prepares_any_data(tmp_path):
    """A bad stream_tile in a synthetic-screen config is an error naming the key before the screen is generated."""
    from mcnn_jax.config import load_config
    from mcnn_jax.train import train_and_evaluate

    cfg = load_config("tiny", ["model.stream_tile=96"])
    assert cfg.data.synthetic.enabled and not cfg.data.store
    with pytest.raises(ValueError, match="model.stream_tile must be 0 .off. or a positive multiple"):
        train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "data").exists()
