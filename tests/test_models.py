import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcnn_jax import MCNN, count_params, from_config, init_params, mcnn_flops
from mcnn_jax.config import base_config


@pytest.fixture(scope="module")
def published():
    """The published model's parameters at 1024x1280x3, initialised once for the tests that read them."""
    return init_params(MCNN(num_classes=13), jax.random.key(0), (1024, 1280, 3))


def test_published_parameter_count(published):
    assert count_params(published) == 42_577_261


def test_published_layer_shapes(published):
    params = published
    assert params["branch0"]["conv0"]["kernel"].shape == (5, 5, 3, 16)
    assert params["branch6"]["conv2"]["kernel"].shape == (5, 5, 64, 64)
    assert params["merge"]["kernel"].shape == (1, 1, 208, 1024)
    assert params["hidden"]["kernel"].shape == (8 * 10 * 1024, 512)
    assert params["logits"]["kernel"].shape == (512, 13)
    assert all(np.all(b == 0) for b in jax.tree_util.tree_leaves(params) if b.ndim == 1)


@pytest.mark.parametrize("hw", [(128, 128), (256, 128), (128, 384)])
def test_output_shapes(hw):
    model = MCNN(num_classes=5, widths=(4, 4, 4, 4, 4, 4, 8), merge_width=16, head_width=8)
    x = jnp.ones((3, *hw, 2))
    params = model.init(jax.random.key(1), x)["params"]
    y = model.apply({"params": params}, x)
    assert y.shape == (3, 5) and y.dtype == jnp.float32
    assert params["hidden"]["kernel"].shape == (hw[0] // 128 * hw[1] // 128 * 16, 8)


@pytest.mark.parametrize("hw", [(100, 128), (128, 200), (64, 128), (1000, 1280)])
def test_unsupported_size_is_a_clear_error(hw):
    model = MCNN(num_classes=3, widths=(2,) * 7, merge_width=4, head_width=4)
    with pytest.raises(ValueError, match=r"multiples of 128.*1024x1280"):
        model.init(jax.random.key(0), jnp.ones((1, *hw, 3)))


def test_branches_must_meet_at_one_resolution():
    with pytest.raises(ValueError, match="same resolution"):
        MCNN(post_pools=(64, 32, 16, 8, 4, 2, 2)).init(jax.random.key(0), jnp.ones((1, 128, 128, 3)))


def test_group_norm_bfloat16_and_remat_options():
    x = jax.random.uniform(jax.random.key(0), (2, 128, 128, 3))
    base = MCNN(num_classes=4, widths=(4, 4, 4, 8, 8, 8, 8), merge_width=8, head_width=8)
    params = base.init(jax.random.key(1), x)["params"]
    y = base.apply({"params": params}, x)
    # rematerialisation changes memory, not the function or its gradient
    remat = base.clone(remat=True)
    np.testing.assert_allclose(remat.apply({"params": params}, x), y, rtol=1e-6, atol=1e-6)
    g = jax.jit(jax.grad(lambda p, m: m.apply({"params": p}, x).sum()), static_argnums=1)
    for a, b in zip(jax.tree_util.tree_leaves(g(params, base)), jax.tree_util.tree_leaves(g(params, remat))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # bfloat16 compute: same parameters (float32), close outputs
    yb = base.clone(dtype="bfloat16").apply({"params": params}, x)
    assert yb.dtype == jnp.float32
    np.testing.assert_allclose(yb, y, rtol=0.1, atol=0.05)
    gn = base.clone(norm="group", norm_groups=2)
    pg = gn.init(jax.random.key(1), x)["params"]
    assert "norm0" in pg["branch0"] and gn.apply({"params": pg}, x).shape == (2, 4)


def test_from_config_matches_published_model():
    cfg = base_config()
    model = from_config(cfg.model, num_classes=13)
    assert model == MCNN(num_classes=13)


def test_flops():
    f = mcnn_flops(MCNN(num_classes=13), 1024, 1280, 3)
    assert abs(f["forward"] / 1e9 - 51.4) < 0.1
    # the full-resolution branch's first conv: 2 * 25 * 3 * 16 * 1024 * 1280
    assert f["train"] > 2.9 * f["forward"]
    # scales with the number of pixels
    g = mcnn_flops(MCNN(num_classes=13), 512, 640, 3)
    assert abs(g["forward"] * 4 - f["forward"]) / f["forward"] < 0.01


def test_flops_match_xla_cost_analysis():
    # plain XLA layers: XLA's cost analysis cannot see inside the native kernels' custom calls
    model = MCNN(num_classes=3, widths=(4, 4, 4, 8, 8, 8, 8), merge_width=16, head_width=8, impl="xla")
    x = jnp.ones((1, 256, 256, 3))
    params = model.init(jax.random.key(0), x)["params"]
    cost = jax.jit(lambda p: model.apply({"params": p}, x)).lower(params).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    counted = mcnn_flops(model, 256, 256, 3)["forward"]
    # XLA skips the zero padding at the borders but counts bias adds, ReLUs and pooling comparisons
    assert 0.95 * counted <= cost["flops"] <= 1.1 * counted
