"""The faster forms (max-pool's custom VJP, impl="fast", impl="native") on microscopy-like fields (tests/fields.py):
flat backgrounds, saturated objects, 8/12-bit quantisation, all-zero borders and constant channels make
max-pool windows hold many equal maxima and put exact zeros before every ReLU. Each faster form is checked
against the plain XLA form AND against finite differences, on these fields and on random ones. The same
comparison at full resolution (1024x1280, the published widths) is ``benchmarks/check_gradients.py``."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import loss_fn, rel_err
from fields import KINDS, field, fields

from mcnn_jax import MCNN
from mcnn_jax.model import pool, xla_conv

REALISTIC = [k for k in KINDS if k != "random"]
WIDE = dict(num_classes=4, widths=(16,) * 7, merge_width=16, head_width=8)  # widths the native kernels take


def test_fields_are_what_they_claim():
    flat = field("flat_saturated", 128, 128)
    assert (flat == np.float32(0.1)).mean() > 0.5 and (flat == 1.0).mean() > 0.01
    f12 = field("offset_12bit", 128, 128)
    np.testing.assert_allclose(f12 * 4095, np.rint(f12 * 4095), atol=1e-3)  # 12-bit levels
    assert (f12 == 1.0).any() and (f12 == np.float32(100 / 4095)).mean() > 0.5  # saturated; flat offset
    f8 = field("8bit_zero_border", 128, 128)
    np.testing.assert_allclose(f8 * 255, np.rint(f8 * 255), atol=1e-3)
    assert (f8 == 0).mean() > 0.5 and (f8[:32] == 0).all()  # the border is exactly zero
    const = field("constant_channel", 128, 128)
    assert (const[..., -1] == const[0, 0, -1]).all()


def _pool_input(kind, seed=0):
    """relu(conv(field) + bias): what the model's max-pools see (a 5x5 box filter, bias 0.05)."""
    x = jnp.asarray(fields(kind, 2, 128, 128, 3, seed))
    kern = jnp.full((5, 5, 3, 4), 0.04).at[..., 1].set(-0.04)  # channel 1 is mostly ReLU'd to exactly 0
    return jax.nn.relu(xla_conv.conv_xla(x, kern) + 0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_max_pool_matches_xla_value_and_gradient(kind):
    z = _pool_input(kind)
    most_ties = 0
    for f in (2, 4, 8, 16, 32, 64):
        y0, vjp0 = jax.vjp(lambda a: nn.max_pool(a, (f, f), strides=(f, f)), z)
        y1, vjp1 = jax.vjp(lambda a: pool.fast_max_pool(a, f), z)
        np.testing.assert_array_equal(y1, y0)
        ct = jax.random.normal(jax.random.key(f), y0.shape)
        np.testing.assert_array_equal(vjp1(ct)[0], vjp0(ct)[0])  # the same input gets each window's gradient
        ties = (z.reshape(2, 128 // f, f, 128 // f, f, 4) == y0[:, :, None, :, None, :]).sum((2, 4))
        most_ties = max(most_ties, int(ties.max()))
    if kind != "random":  # the case that broke the old gradient: windows with thousands of equal maxima
        assert most_ties > 1000, most_ties


def test_max_pool_gradient_sums_to_the_output_gradient():
    z = jnp.zeros((1, 64, 64, 2)).at[0, 3, 5, 1].set(-1.0)  # every window all ties (but one entry)
    for f in (2, 8, 64):
        y, vjp = jax.vjp(lambda a: pool.fast_max_pool(a, f), z)
        ct = jnp.ones_like(y)
        g = vjp(ct)[0]
        np.testing.assert_array_equal(g.reshape(1, 64 // f, f, 64 // f, f, 2).sum((2, 4)), ct)
        assert g[0, 0, 0, 0] == 1.0  # the first (row-major) maximum of the window gets it, as in XLA


def test_max_pool_propagates_nan_like_max():
    z = jnp.arange(32.0).reshape(1, 4, 4, 2).at[0, 1, 1, 0].set(jnp.nan)
    y = pool.fast_max_pool(z, 2)
    ref = nn.max_pool(z, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(y[~np.isnan(y)], ref[~np.isnan(ref)])


def _shift_biases(params, shift):
    """Biases + shift: a flat region then gives a constant positive activation (ties above 0, not at 0)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v + shift if jax.tree_util.keystr(path).endswith("['bias']") else v, params
    )


_grad = jax.jit(jax.grad(lambda p, m, x, y: loss_fn(x, y)(p, m)), static_argnums=1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift", [0.0, 0.05])
def test_model_gradients_equal_plain_xla(kind, shift):
    x = jnp.asarray(fields(kind, 2, 128, 256, 3))
    y = jnp.array([1, 2])
    plain = MCNN(impl="xla", **WIDE)
    params = _shift_biases(plain.init(jax.random.key(1), x)["params"], shift)
    g0 = _grad(params, plain, x, y)
    for impl, remat in (("native", False), ("fast", False), ("native", True)):
        g1 = _grad(params, MCNN(impl=impl, remat=remat, **WIDE), x, y)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves(g1)):
            assert rel_err(b, a) < 1e-4, (impl, remat, jax.tree_util.keystr(path), rel_err(b, a))


# the parameter, then the largest-gradient entry of a leaf in every part of the model
CHOSEN = [
    (("branch0", "conv0", "bias"), (0,)),
    (("branch0", "conv2", "bias"), None),
    (("branch2", "conv1", "kernel"), None),
    (("branch6", "conv2", "kernel"), None),
    (("merge", "kernel"), None),
    (("hidden", "kernel"), None),
    (("logits", "bias"), None),
]


def _perturbed(params, path, idx, delta):
    """A copy of the nested parameter dict with params[path][idx] += delta."""
    if not path:
        return params.at[idx].add(delta)
    return {**params, path[0]: _perturbed(params[path[0]], path[1:], idx, delta)}


@pytest.mark.parametrize("kind", ["flat_saturated", "8bit_zero_border", "random"])
def test_native_gradient_matches_finite_differences(kind):
    """d loss / d p of the default model (float32, native) against a central difference of the plain model
    evaluated in float64 (so rounding does not hide a wrong gradient), for chosen parameters."""
    x = fields(kind, 2, 128, 128, 3)
    y = jnp.array([1, 2])
    model = MCNN(**WIDE)
    params = _shift_biases(model.init(jax.random.key(1), jnp.asarray(x))["params"], 0.05)
    g = _grad(params, model, jnp.asarray(x), y)
    with jax.enable_x64(True):
        m64 = MCNN(impl="xla", dtype=jnp.float64, **WIDE)
        p64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), params)
        loss64 = jax.jit(lambda p, x: loss_fn(x, y)(p, m64))
        x64 = jnp.asarray(x, jnp.float64)
        eps = 1e-6  # float64: rounding ~1e-10; small enough not to cross a ReLU kink or a tie here
        for path, idx in CHOSEN:
            leaf = functools.reduce(lambda t, k: t[k], path, g)
            idx = idx or np.unravel_index(int(np.abs(leaf).argmax()), leaf.shape)
            fd = float(loss64(_perturbed(p64, path, idx, eps), x64) - loss64(_perturbed(p64, path, idx, -eps), x64)) / (
                2 * eps
            )
            got = float(leaf[idx])
            assert abs(fd) > 1e-6 or path == ("branch0", "conv0", "bias"), (path, fd)  # a real check
            assert abs(got - fd) <= 1e-3 * max(abs(fd), 1e-4), (path, idx, got, fd)
