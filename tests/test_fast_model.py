"""The fast forms (mcnn_jax.model.xla_conv, mcnn_jax.model.pool, MCNN(impl="fast")) compute the same function, with the
same parameters
and the same gradients, as the plain XLA forms (MCNN(impl="xla"))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_model
from conftest import rel_err as _rel

from mcnn_jax import MCNN, count_params
from mcnn_jax.model import pool, xla_conv
from mcnn_jax.model.mcnn import from_config

SMALL = dict(num_classes=5, widths=(4, 4, 4, 8, 8, 8, 8), merge_width=16, head_width=8)


@pytest.mark.parametrize(
    "shape,k,chunk",
    [
        ((2, 37, 45, 3, 5), 5, 0),
        ((2, 37, 45, 3, 5), 5, 7),
        ((1, 40, 24, 16, 16), 5, 1000),
        ((3, 16, 20, 6, 4), 3, 5),
        ((1, 12, 12, 2, 3), 4, 0),
    ],
)
def test_kernel_grad_matches_xla(shape, k, chunk):
    n, h, w, c, o = shape
    x = jax.random.normal(jax.random.key(0), (n, h, w, c))
    ct = jax.random.normal(jax.random.key(2), (n, h, w, o))
    kern = jax.random.normal(jax.random.key(1), (k, k, c, o))
    ref = jax.vjp(lambda p: xla_conv.conv_xla(x, p), kern)[1](ct)[0]
    got = xla_conv.kernel_grad(x, ct, k, chunk)
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-5


def test_conv_fast_value_and_grads():
    x = jax.random.normal(jax.random.key(0), (2, 32, 48, 16))
    kern = jax.random.normal(jax.random.key(1), (5, 5, 16, 8)) * 0.1
    ct = jax.random.normal(jax.random.key(2), (2, 32, 48, 8))
    y0, f0 = jax.vjp(xla_conv.conv_xla, x, kern)
    y1, f1 = jax.vjp(xla_conv.conv_fast, x, kern)
    np.testing.assert_array_equal(y0, y1)
    for a, b in zip(f0(ct), f1(ct)):
        assert _rel(b, a) < 1e-5


def test_max_pool_same_as_flax():
    import flax.linen as nn

    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 32, 64, 3)))
    for f in (1, 2, 4, 16):
        ref = x if f == 1 else nn.max_pool(x, (f, f), strides=(f, f))
        np.testing.assert_array_equal(pool.fast_max_pool(x, f), ref)
    ct = jax.random.normal(jax.random.key(1), (2, 8, 16, 3))
    g0 = jax.vjp(lambda a: nn.max_pool(a, (4, 4), strides=(4, 4)), x)[1](ct)[0]
    g1 = jax.vjp(lambda a: pool.fast_max_pool(a, 4), x)[1](ct)[0]
    np.testing.assert_allclose(g1, g0, atol=1e-6)  # no ties among the positive maxima of random data


def test_same_parameter_tree_and_count():
    x = jax.ShapeDtypeStruct((1, 1024, 1280, 3), jnp.float32)
    shapes = lambda m: jax.tree_util.tree_map(  # noqa: E731
        lambda p: p.shape, jax.eval_shape(m.init, jax.random.key(0), x)["params"]
    )
    assert shapes(MCNN(num_classes=13, impl="fast")) == shapes(MCNN(num_classes=13, impl="xla"))
    assert (
        sum(
            int(np.prod(s.shape))
            for s in jax.tree_util.tree_leaves(jax.eval_shape(MCNN(num_classes=13).init, jax.random.key(0), x))
        )
        == 42_577_261
    )
    x = jnp.ones((1, 128, 128, 3))
    p0 = MCNN(impl="xla", **SMALL).init(jax.random.key(3), x)["params"]
    p1 = MCNN(impl="fast", **SMALL).init(jax.random.key(3), x)["params"]
    assert count_params(p0) == count_params(p1)
    for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p1)):
        np.testing.assert_array_equal(a, b)  # identical initialisation too


@pytest.mark.parametrize("hw,remat", [((128, 128), False), ((256, 128), True)])
def test_fast_model_same_outputs_and_gradients(hw, remat):
    x = jax.random.uniform(jax.random.key(0), (2, *hw, 3))
    plain = MCNN(impl="xla", remat=remat, **SMALL)
    fast = MCNN(impl="fast", remat=remat, **SMALL)
    params = plain.init(jax.random.key(1), x)["params"]
    assert_same_model(plain, fast, params, x, jnp.array([1, 3]))


def test_impl_key():
    assert from_config({"impl": "xla"}).impl == "xla"
    with pytest.raises(ValueError, match="impl"):
        MCNN(impl="cuda", **SMALL).init(jax.random.key(0), jnp.ones((1, 128, 128, 3)))


def test_large_batches_are_convolved_in_groups(monkeypatch):
    # XLA:CPU's conv aborts once N*H*W*kh*kw*C reaches 2^31 (batch > 4 at 1024x1280x16): conv_fast splits the
    # batch into groups below the limit. Lower the limit to exercise the split on small arrays.
    monkeypatch.setattr(xla_conv, "_IM2COL_LIMIT", 2 * 16 * 16 * 25 * 4)
    assert xla_conv._group(6, 16 * 16 * 25 * 4) == 2
    x = jax.random.normal(jax.random.key(0), (6, 16, 16, 4))
    kern = jax.random.normal(jax.random.key(1), (5, 5, 4, 3))
    ct = jax.random.normal(jax.random.key(2), (6, 16, 16, 3))
    y0, f0 = jax.vjp(xla_conv.conv_xla, x, kern)
    y1, f1 = jax.vjp(jax.jit(xla_conv.conv_fast), x, kern)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(f0(ct), f1(ct)):
        assert _rel(b, a) < 1e-5


@pytest.mark.parametrize("kind", ["8bit_zero_border", "flat_saturated"])
@pytest.mark.parametrize("shape,k,chunk", [((2, 37, 45, 3, 5), 5, 7), ((3, 16, 20, 6, 4), 3, 5)])
def test_kernel_grad_on_realistic_fields(kind, shape, k, chunk):
    """kernel_grad's chunks cross image boundaries (the k-1 zero rows between stacked images keep them apart)
    and leave a remainder: on fields with zero borders and flat regions, and a sparse output gradient (a
    max-pool's), it still equals XLA's kernel gradient."""
    from fields import fields

    n, h, w, c, o = shape
    x = jnp.asarray(fields(kind, n, h, w, c))
    ct = jax.random.normal(jax.random.key(2), (n, h, w, o)) * (
        jax.random.uniform(jax.random.key(3), (n, h, w, o)) < 1 / 16
    )
    kern = jax.random.normal(jax.random.key(1), (k, k, c, o))
    ref = jax.vjp(lambda p: xla_conv.conv_xla(x, p), kern)[1](ct)[0]
    assert (n * (h + k - 1)) % chunk  # a remainder chunk
    assert _rel(xla_conv.kernel_grad(x, ct, k, chunk), ref) < 1e-5
