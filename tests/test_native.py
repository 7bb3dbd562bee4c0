"""The native CPU kernels (mcnn_jax.model.native, MCNN(impl="native")) compute the same function, with the same
gradients, as the plain XLA forms; they build here; and a machine that cannot build them falls back."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_model, loss_fn
from conftest import rel_err as _rel

from mcnn_jax import MCNN
from mcnn_jax.model import native, xla_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_build_and_load_here():
    s = native.status()
    assert s["ok"], s["reason"]
    assert s["vector_width"] in (4, 8, 16) and s["threads"] >= 1
    assert os.path.exists(s["path"])


def _conv64(x, kern):
    """Direct 'SAME' convolution in float64 numpy: the reference for both implementations."""
    x, kern = np.asarray(x, np.float64), np.asarray(kern, np.float64)
    k = kern.shape[0]
    lo = (k - 1) // 2
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0)))
    y = np.zeros((n, h, w, kern.shape[-1]))
    for i in range(k):
        for j in range(k):
            y += np.einsum("nhwc,co->nhwo", xp[:, i : i + h, j : j + w], kern[i, j])
    return y


# (n, h, w, c, o, k): thin and wide channels, 3 input channels (the image), odd sizes that leave remainders in
# every register tile, and a 3x3 kernel.
CASES = [
    (1, 37, 45, 3, 16, 5),
    (2, 20, 29, 16, 16, 5),
    (1, 13, 50, 16, 32, 5),
    (2, 9, 11, 32, 64, 5),
    (1, 16, 21, 16, 16, 3),
]


@pytest.mark.parametrize("n,h,w,c,o,k", CASES)
def test_native_conv_value_and_grads(n, h, w, c, o, k):
    x = jax.random.normal(jax.random.key(0), (n, h, w, c))
    kern = jax.random.normal(jax.random.key(1), (k, k, c, o)) * 0.2
    ct = jax.random.normal(jax.random.key(2), (n, h, w, o))
    assert native.supports(c, o, k, jnp.float32)[0]
    y1, f1 = jax.vjp(jax.jit(native.conv), x, kern)
    y0, f0 = jax.vjp(xla_conv.conv_xla, x, kern)
    ref = _conv64(x, kern)
    assert _rel(y1, ref) < 1e-5
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4)
    (dx1, dk1), (dx0, dk0) = f1(ct), f0(ct)
    # float64 references: dx is the conv of ct with the flipped, transposed kernel; dk by its definition
    dx_ref = _conv64(ct, np.flip(np.asarray(kern), (0, 1)).transpose(0, 1, 3, 2)) if k % 2 else None
    lo = (k - 1) // 2
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0)))
    dk_ref = np.stack(
        [
            np.stack(
                [np.einsum("nhwc,nhwo->co", xp[:, i : i + h, j : j + w], np.asarray(ct, np.float64)) for j in range(k)]
            )
            for i in range(k)
        ]
    )
    assert _rel(dx1, dx_ref) < 1e-5 and _rel(dx0, dx_ref) < 1e-5
    assert _rel(dk1, dk_ref) < 1e-5 and _rel(dk0, dk_ref) < 1e-5


def test_native_model_same_outputs_and_gradients():
    widths = dict(num_classes=5, widths=(16,) * 7, merge_width=16, head_width=8)
    x = jax.random.uniform(jax.random.key(0), (2, 128, 256, 3))
    plain, nat = MCNN(impl="xla", **widths), MCNN(impl="native", **widths)
    params = plain.init(jax.random.key(1), x)["params"]
    labels = jnp.array([1, 3])
    # the native kernels are really in the compiled step, forward and backward
    assert "mcnn_conv_fwd" in jax.jit(nat.apply).lower({"params": params}, x).as_text()
    grad = jax.jit(jax.grad(lambda p, m, x, y: loss_fn(x, y)(p, m)), static_argnums=1)
    assert "mcnn_conv_dk" in grad.lower(params, nat, x, labels).as_text()
    assert_same_model(plain, nat, params, x, labels)


def test_unsupported_layers_use_the_xla_form():
    # channels that are not a multiple of the vector width, and bfloat16, take the "fast" XLA form
    assert native.supports(16, 3, 5, jnp.float32) == (False, True)  # dx alone could, but conv_native needs fwd
    assert native.supports(16, 16, 5, jnp.bfloat16) == (False, False)
    assert native.supports(16, 16, 4, jnp.float32) == (False, False)
    m = MCNN(num_classes=3, widths=(4,) * 7, merge_width=8, head_width=8, impl="native")
    x = jnp.ones((1, 128, 128, 3))
    params = m.init(jax.random.key(0), x)["params"]
    assert "mcnn_conv" not in jax.jit(m.apply).lower({"params": params}, x).as_text()


FALLBACK = """
import warnings, jax, jax.numpy as jnp
from mcnn_jax import MCNN
from mcnn_jax.model import native
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    m = MCNN(num_classes=3, widths=(16,) * 7, merge_width=8, head_width=8)
    x = jnp.ones((1, 128, 128, 3))
    params = m.init(jax.random.key(0), x)["params"]
    y = m.apply({"params": params}, x)
print("OK", y.shape, native.status()["reason"])
print("WARN", [str(x.message) for x in w if "native" in str(x.message)][:1])
"""


def test_falls_back_with_a_warning_when_no_compiler(tmp_path):
    env = dict(
        os.environ,
        CXX=str(tmp_path / "no-such-compiler"),
        MCNN_NATIVE_CACHE=str(tmp_path / "cache"),
        MCNN_COMPILATION_CACHE="0",
        JAX_PLATFORMS="cpu",
    )
    r = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "OK (1, 3)" in r.stdout and "no C++ compiler" in r.stdout
    assert "using the XLA form" in r.stdout
    assert not any(p.suffix == ".so" for p in (tmp_path / "cache").glob("*"))


@pytest.mark.parametrize("n,h,w,c,o,k", [CASES[0], CASES[1], CASES[3]])
def test_fused_conv_bias_relu_value_and_grads(n, h, w, c, o, k):
    x = jax.random.normal(jax.random.key(0), (n, h, w, c))
    kern = jax.random.normal(jax.random.key(1), (k, k, c, o)) * 0.2
    bias = jax.random.normal(jax.random.key(3), (o,))
    ct = jax.random.normal(jax.random.key(2), (n, h, w, o))
    plain = lambda x, kern, bias: jax.nn.relu(xla_conv.conv_xla(x, kern) + bias)  # noqa: E731
    z1, f1 = jax.vjp(jax.jit(native.conv_bias_relu), x, kern, bias)
    z0, f0 = jax.vjp(plain, x, kern, bias)
    assert float((z0 > 0).mean()) > 0.2 and float((z0 == 0).mean()) > 0.2  # the mask matters
    np.testing.assert_allclose(z1, z0, rtol=1e-4, atol=1e-4)
    for name, a, b in zip(("dx", "dkernel", "dbias"), f0(ct), f1(ct)):
        assert _rel(b, a) < 1e-5, name


@pytest.mark.parametrize("kind", ["8bit_zero_border", "flat_saturated", "constant_channel"])
@pytest.mark.parametrize("n,h,w,c,o,k", [CASES[0], CASES[1], CASES[4]])
def test_native_kernels_on_realistic_fields(kind, n, h, w, c, o, k):
    """Fused conv + bias + ReLU on microscopy-like inputs with a zero bias: all-zero borders put pre-activations
    at exactly 0 (the ReLU's mask at 0), flat regions give equal outputs, and the output gradient is sparse, as
    a max-pool's is (one entry per window). Values and all three gradients equal the plain XLA form's."""
    from fields import fields

    x = jnp.asarray(fields(kind, n, h, w, c))
    kern = jax.random.normal(jax.random.key(1), (k, k, c, o)) * 0.2
    bias = jnp.zeros((o,))
    ct = jax.random.normal(jax.random.key(2), (n, h, w, o)) * (
        jax.random.uniform(jax.random.key(3), (n, h, w, o)) < 1 / 16
    )
    plain = lambda x, kern, bias: jax.nn.relu(xla_conv.conv_xla(x, kern) + bias)  # noqa: E731
    z1, f1 = jax.vjp(jax.jit(native.conv_bias_relu), x, kern, bias)
    z0, f0 = jax.vjp(plain, x, kern, bias)
    pre = xla_conv.conv_xla(x, kern)
    if kind == "8bit_zero_border":
        assert float((pre == 0).mean()) > 0.05  # exact zeros before the ReLU: its mask at 0 is exercised
    np.testing.assert_allclose(z1, z0, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(("dx", "dkernel", "dbias"), f0(ct), f1(ct)):
        assert _rel(b, a) < 1e-5, name
