"""The gradient noise scale (mcnn_jax.optim.noise_scale, benchmarks/measure_noise_scale.py): the estimator is unbiased
on
gradients of known mean and covariance; on a linear softmax model it equals the closed-form per-image gradients'
chunk statistics; identical images have no noise; padded batches are left out; the command runs on a trained
run's checkpoints."""

import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcnn_jax.optim.noise_scale import chunk_moments, gradient_noise_scale, noise_scale

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def chunked(per_image: np.ndarray, b: int) -> np.ndarray:
    """Chunk means of consecutive ``b`` rows."""
    return per_image.reshape(-1, b, per_image.shape[-1]).mean(1)


def test_the_estimates_are_unbiased_for_a_known_mean_and_covariance():
    rng = np.random.default_rng(0)
    d, n, b = 6, 64, 4
    G = rng.normal(size=d)
    L = rng.normal(size=(d, d)) * 0.7
    sigma = L @ L.T  # per-image covariance
    traces, norms = [], []
    for _ in range(3000):
        per_image = G + rng.normal(size=(n, d)) @ L.T
        r = noise_scale(*chunk_moments(chunked(per_image, b)), chunk_size=b)
        traces.append(r["trace_sigma"])
        norms.append(r["grad_norm_sq"])
    se_t, se_n = np.std(traces) / np.sqrt(len(traces)), np.std(norms) / np.sqrt(len(norms))
    assert abs(np.mean(traces) - np.trace(sigma)) < 4 * se_t
    assert abs(np.mean(norms) - G @ G) < 4 * se_n
    # the uncorrected |mean|^2 is biased upwards by tr(Sigma) / n: the correction is needed
    assert np.mean([t / n + g for t, g in zip(traces, norms)]) - G @ G > 10 * se_n
    assert r["chunks"] == n // b and r["images"] == n


class Linear(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_chunk_gradients_of_a_linear_model_match_the_closed_form():
    """Softmax regression: the per-image gradient is x (p - t)^T and p - t, so the chunk means and the estimate
    follow in numpy; images are 8-bit quantised with a flat zero border (exact zeros in x)."""
    rng = np.random.default_rng(1)
    n, b, classes, smoothing = 48, 8, 3, 0.1
    images = np.zeros((n, 6, 6, 2), np.float32)
    images[:, 1:5, 1:5] = np.round(rng.uniform(0, 255, (n, 4, 4, 2))) / 255
    labels = rng.integers(0, classes, n).astype(np.int32)
    model = Linear(classes)
    params = model.init(jax.random.key(0), jnp.asarray(images[:1]))["params"]
    r = gradient_noise_scale(
        model,
        params,
        [dict(image=images[i : i + b], label=labels[i : i + b]) for i in range(0, n, b)],
        classes,
        smoothing,
    )
    x = images.reshape(n, -1).astype(np.float64)
    W, bias = np.asarray(params["Dense_0"]["kernel"], np.float64), np.asarray(params["Dense_0"]["bias"], np.float64)
    t = np.full((n, classes), smoothing / classes)
    t[np.arange(n), labels] += 1 - smoothing
    delta = softmax(x @ W + bias) - t
    per_image = np.concatenate([delta, (x[:, :, None] * delta[:, None, :]).reshape(n, -1)], 1)  # bias, kernel
    expected = noise_scale(*chunk_moments(chunked(per_image, b)), chunk_size=b)
    for k in ("trace_sigma", "grad_norm_sq", "b_simple"):
        assert r[k] == pytest.approx(expected[k], rel=1e-4), k
    assert r["chunks"] == n // b and r["skipped_batches"] == 0


def test_identical_images_have_no_noise_and_padded_batches_are_left_out():
    rng = np.random.default_rng(2)
    model = Linear(2)
    image = np.zeros((1, 4, 4, 1), np.float32)
    image[0, 1:3, 1:3] = 1.0  # a saturated object on a flat background
    params = model.init(jax.random.key(0), jnp.asarray(image))["params"]
    same = dict(image=np.repeat(image, 4, 0), label=np.zeros(4, np.int32), mask=np.ones(4, np.float32))
    padded = dict(
        image=rng.uniform(size=(4, 4, 4, 1)).astype(np.float32),
        label=np.ones(4, np.int32),
        mask=np.array([1, 1, 0, 0], np.float32),
    )
    r = gradient_noise_scale(model, params, [same, same, padded, same], 2)
    assert r["chunks"] == 3 and r["skipped_batches"] == 1
    assert abs(r["trace_sigma"]) <= 1e-9 * r["grad_norm_sq"] and r["grad_norm_sq"] > 0
    assert abs(r["b_simple"]) < 1e-8
    with pytest.raises(ValueError, match="batch 1 holds 2 images, the batches before it 4"):
        gradient_noise_scale(model, params, [same, {k: v[:2] for k, v in same.items()}], 2)
    with pytest.raises(ValueError, match="at least 2 chunks"):
        gradient_noise_scale(model, params, [same], 2)
    with pytest.raises(ValueError, match="no complete batch"):
        gradient_noise_scale(model, params, [padded], 2)


def test_the_command_measures_a_runs_checkpoints(store, tmp_path):
    import measure_noise_scale as cli

    from mcnn_jax.config import load_config
    from mcnn_jax.train import train_and_evaluate

    config = load_config(
        str(ROOT / "configs" / "tiny.py"),
        [f"data.store={store}", "train.max_steps=4", "train.checkpoint_every_steps=2"],
    )
    train_and_evaluate(config, tmp_path / "run")
    out = tmp_path / "ns.json"
    rows = cli.main(
        [
            "--run",
            str(tmp_path / "run"),
            "--checkpoints",
            "init,all",
            "--chunk",
            "2",
            "--max-images",
            "8",
            "--out",
            str(out),
        ]
    )
    assert [r["checkpoint"] for r in rows] == ["init", 2, 4]
    assert json.loads(out.read_text())["rows"] == rows
    for r in rows:
        assert r["chunks"] == 4 and r["images"] == 8 and r["trace_sigma"] > 0 and np.isfinite(r["grad_norm_sq"])
    with pytest.raises(SystemExit, match="no checkpoint of step 7 .* kept steps: \\[2, 4\\]"):
        cli.main(["--run", str(tmp_path / "run"), "--checkpoints", "7"])
    with pytest.raises(SystemExit, match="no checkpoint in"):
        cli.main(["--run", str(tmp_path / "empty")])
