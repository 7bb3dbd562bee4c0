import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mcnn_jax import optim
from mcnn_jax.config import base_config


def _cfg(**kw):
    c = base_config().optim
    c.update(kw)
    return c


def _params():
    return {
        "conv": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.3, -0.1])},
        "norm": {"scale": jnp.array([1.0, 1.0])},
    }


def _grads():
    return {
        "conv": {"kernel": jnp.array([[0.1, 0.2], [-0.3, 0.05]]), "bias": jnp.array([0.5, -0.5])},
        "norm": {"scale": jnp.array([0.2, -0.1])},
    }


def test_lars_two_steps_equal_the_formula_by_hand():
    lr, wd, tc, mom = 0.1, 0.01, 0.02, 0.9
    tx = optim.make_optimizer(
        _cfg(name="lars", weight_decay=wd, trust_coefficient=tc, eps=0.0, momentum=mom, nesterov=False),
        optax.constant_schedule(lr),
    )
    p, g = _params(), _grads()
    state = tx.init(p)
    u1, state = tx.update(g, state, p)
    p1 = optax.apply_updates(p, u1)
    u2, state = tx.update(g, state, p1)

    def by_hand(param, grad, decay):
        param, grad = np.asarray(param, np.float64), np.asarray(grad, np.float64)
        if not decay:  # bias / norm: plain momentum SGD, no weight decay, no trust ratio
            return grad
        d = grad + wd * param
        return tc * np.linalg.norm(param) / np.linalg.norm(d) * d

    for path, decay in ((("conv", "kernel"), True), (("conv", "bias"), False), (("norm", "scale"), False)):

        def get(t, path=path):
            return t[path[0]][path[1]]

        m1 = by_hand(get(p), get(g), decay)
        np.testing.assert_allclose(get(u1), -lr * m1, rtol=1e-5)
        m2 = by_hand(get(p) - lr * m1, get(g), decay) + mom * m1
        np.testing.assert_allclose(get(u2), -lr * m2, rtol=1e-5)


def test_masks_leave_biases_and_norms_alone():
    mask = optim.decay_mask(_params())
    assert mask == {"conv": {"kernel": True, "bias": False}, "norm": {"scale": False}}
    for name in ("sgd", "nesterov", "adamw", "lars", "lamb"):
        tx = optim.make_optimizer(_cfg(name=name, weight_decay=0.5), optax.constant_schedule(0.1))
        zero = jax.tree_util.tree_map(jnp.zeros_like, _params())
        u, _ = tx.update(zero, tx.init(_params()), _params())
        # with zero gradients only weight decay moves a parameter: kernels move, biases and scales do not
        assert np.all(np.asarray(u["conv"]["bias"]) == 0) and np.all(np.asarray(u["norm"]["scale"]) == 0), name
        assert np.any(np.asarray(u["conv"]["kernel"]) != 0), name


def test_nesterov_sgd_matches_the_formula():
    lr, wd, mom = 0.05, 0.1, 0.9
    tx = optim.make_optimizer(_cfg(name="nesterov", weight_decay=wd, momentum=mom), optax.constant_schedule(lr))
    p, g = _params(), _grads()
    u, _ = tx.update(g, tx.init(p), p)
    d = np.asarray(g["conv"]["kernel"]) + wd * np.asarray(p["conv"]["kernel"])
    # optax's Nesterov: update = -lr * (g + mom * trace), trace = g on the first step
    np.testing.assert_allclose(u["conv"]["kernel"], -lr * (d + mom * d), rtol=1e-6)
    np.testing.assert_allclose(u["conv"]["bias"], -lr * (1 + mom) * np.asarray(g["conv"]["bias"]), rtol=1e-6)


def test_linear_scaling_rule_and_steps():
    assert optim.scaled_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert optim.scaled_lr(0.1, 1024, 256, "sqrt") == pytest.approx(0.2)
    assert optim.scaled_lr(0.1, 1024, 256, "none") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.lr_scaling"):
        optim.scaled_lr(0.1, 1024, 256, "quadratic")
    assert optim.steps_per_epoch(3848, 32) == 120
    with pytest.raises(ValueError, match="fewer than one global batch"):
        optim.steps_per_epoch(10, 32)


def test_published_recipe_schedule():
    # warmup 0.001 -> 0.008 over 5 epochs, then linear decay to 1e-4 at the end (batch 32 = base batch)
    c = _cfg(
        base_lr=0.008, base_batch=32, warmup_init_lr=0.001, warmup_epochs=5, decay="linear", end_lr=1e-4, epochs=50
    )
    s = optim.make_schedule(c, steps_per_epoch=100, global_batch=32)
    assert float(s(0)) == pytest.approx(0.001)
    assert float(s(250)) == pytest.approx(0.0045)
    assert float(s(500)) == pytest.approx(0.008)
    assert float(s(2750)) == pytest.approx((0.008 + 1e-4) / 2, rel=1e-5)
    assert float(s(5000)) == pytest.approx(1e-4)
    # the global batch scales the peak: 4x the batch, 4x the peak
    s4 = optim.make_schedule(c, steps_per_epoch=25, global_batch=128)
    assert float(s4(125)) == pytest.approx(0.032)
    c.lr_scaling = "sqrt"  # 4x the batch, 2x the peak
    assert float(optim.make_schedule(c, steps_per_epoch=25, global_batch=128)(125)) == pytest.approx(0.016)


@pytest.mark.parametrize(
    "decay,at_half", [("cosine", 0.5 * (0.1 + 0.001)), ("polynomial", None), ("step", 0.01), ("constant", 0.1)]
)
def test_decay_shapes(decay, at_half):
    c = _cfg(
        base_lr=0.1,
        base_batch=8,
        warmup_init_lr=0.0,
        warmup_epochs=1,
        decay=decay,
        end_lr=0.001,
        power=2.0,
        step_epochs=(5.0,),
        step_gamma=0.1,
        epochs=11,
    )
    s = optim.make_schedule(c, steps_per_epoch=10, global_batch=8)
    assert float(s(5)) == pytest.approx(0.05)  # warming up
    assert float(s(10)) == pytest.approx(0.1)  # the peak
    if decay == "polynomial":
        assert float(s(60)) == pytest.approx((0.1 - 0.001) * 0.25 + 0.001, rel=1e-5)
    else:
        assert float(s(60)) == pytest.approx(at_half, rel=1e-4)
    if decay in ("cosine", "polynomial"):
        assert float(s(110)) == pytest.approx(0.001, rel=1e-4)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="optim.name"):
        optim.make_optimizer(_cfg(name="adam"), optax.constant_schedule(0.1))
    with pytest.raises(ValueError, match="optim.decay"):
        optim.make_schedule(_cfg(decay="exp"), 10, 32)


def test_label_smoothing_cross_entropy():
    """The training loss's targets (``step.loss_and_metrics``: optax's cross-entropy against these)."""
    logits = jnp.array([[2.0, 0.0, -1.0]])
    p = jax.nn.softmax(logits[0])
    smooth = 0.1
    target = np.array([1 - smooth + smooth / 3, smooth / 3, smooth / 3])
    expected = -(target * np.log(p)).sum()
    loss = optax.softmax_cross_entropy(logits, optim.smoothed_targets(jnp.array([0]), 3, smooth)).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_cyclic_schedule_values_at_chosen_steps():
    """3 main epochs (1 of warmup, linear decay), then 2 cosine-restart cycles of 1 epoch; 4 steps per epoch,
    global batch 64 = twice the base batch, so the peaks (0.008 main, 0.004 cycle) are doubled."""
    cfg = _cfg(
        epochs=3.0,
        warmup_epochs=1.0,
        decay="linear",
        warmup_init_lr=0.001,
        base_lr=0.008,
        base_batch=32,
        end_lr=1e-4,
        cycles=2,
        cycle_epochs=1.0,
        cycle_base_lr=0.004,
    )
    schedule = optim.make_schedule(cfg, steps_per_epoch=4, global_batch=64)
    assert optim.snapshot_steps(cfg, 4) == [12, 16, 20] and optim.total_steps(cfg, 4) == 20
    cosine = lambda i, n: 1e-4 + (0.008 - 1e-4) * 0.5 * (1 + np.cos(np.pi * i / n))  # noqa: E731
    expected = {
        0: 0.001,
        4: 0.016,
        11: 0.016 + (1e-4 - 0.016) * 7 / 8,  # main run: warmup, linear decay
        12: 0.008,
        13: cosine(1, 3),
        14: cosine(2, 3),
        15: 1e-4,  # cycle 1: restart, cosine to end_lr
        16: 0.008,
        18: cosine(2, 3),
        19: 1e-4,
        25: 1e-4,
    }  # cycle 2; after the last: end_lr
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-5), step
    no_cycles = _cfg(epochs=3.0, warmup_epochs=1.0, cycles=0)
    assert optim.snapshot_steps(no_cycles, 4) == [] and optim.total_steps(no_cycles, 4) == 12
    assert float(optim.make_schedule(no_cycles, 4, 64)(13)) == pytest.approx(1e-4)  # stays at end_lr
    with pytest.raises(ValueError, match="optim.cycle_base_lr must be positive"):
        optim.make_schedule(_cfg(cycles=1, cycle_base_lr=0.0), 4, 64)


def test_lamb_step_equals_the_formula_by_hand():
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    tx = optim.make_optimizer(_cfg(name="lamb", weight_decay=wd, b1=b1, b2=b2, eps=eps), optax.constant_schedule(lr))
    p, g = _params(), _grads()
    u, _ = tx.update(g, tx.init(p), p)

    def by_hand(param, grad, layerwise):
        param, grad = np.asarray(param, np.float64), np.asarray(grad, np.float64)
        m, v = (1 - b1) * grad / (1 - b1), (1 - b2) * grad**2 / (1 - b2)  # bias-corrected first step
        adam = m / (np.sqrt(v) + eps)
        if not layerwise:  # bias / norm: Adam's step, no weight decay, no trust ratio
            return -lr * adam
        d = adam + wd * param
        return -lr * np.linalg.norm(param) / np.linalg.norm(d) * d

    for path, layerwise in ((("conv", "kernel"), True), (("conv", "bias"), False), (("norm", "scale"), False)):
        np.testing.assert_allclose(
            u[path[0]][path[1]], by_hand(p[path[0]][path[1]], g[path[0]][path[1]], layerwise), rtol=1e-5
        )
    # the kernel's step is the learning rate relative to its norm, whatever the gradient's scale
    big, _ = tx.update(jax.tree_util.tree_map(lambda x: 1e3 * x, g), tx.init(p), p)
    assert np.linalg.norm(big["conv"]["kernel"]) == pytest.approx(lr * np.linalg.norm(p["conv"]["kernel"]), rel=1e-5)
