"""Micro-batching inside the one train step (issue 13): k micro-batches of m images make the same update as one
batch of k x m, on one rank (here) and on two (tests/test_mpi.py); a micro-batch that does not divide the local
batch is a clear error; checkpoints are those of a run without micro-batches."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcnn_jax.config import base_config, load_config
from mcnn_jax.evaluation.run import load_model
from mcnn_jax.model.mcnn import MCNN, init_params
from mcnn_jax.optim import make_optimizer, make_schedule
from mcnn_jax.runtime import enable_compilation_cache
from mcnn_jax.step import create_state, make_train_step, num_microbatches
from mcnn_jax.train import train_and_evaluate

enable_compilation_cache()
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def max_rel_diff(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) > 0
    return max(
        float(
            np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()
            / (np.abs(np.asarray(y, np.float64)).max() + 1e-12)
        )
        for x, y in zip(la, lb)
    )


def run_steps(microbatch, batches):
    model = MCNN(num_classes=4, widths=(2, 2, 2, 4, 4, 4, 4), merge_width=16, head_width=16)
    cfg = base_config().optim
    tx = make_optimizer(cfg, make_schedule(cfg, 2, 8))
    state = create_state(init_params(model, jax.random.key(0), (128, 128, 3)), tx, 0)
    step = make_train_step(model, tx, 4, label_smoothing=0.1, microbatch=microbatch)
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return jax.device_get(state.params), metrics


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        mask = np.ones(8, np.float32)
        if i == 2:
            mask[5:] = 0.0  # a padded batch: the masked images count in neither the loss nor the metrics
        out.append(
            dict(
                image=jnp.asarray(rng.uniform(size=(8, 128, 128, 3)), jnp.float32),
                label=jnp.asarray(rng.integers(0, 4, 8), jnp.int32),
                mask=jnp.asarray(mask),
            )
        )
    return out


@pytest.mark.parametrize("microbatch", [4, 2, 1])
def test_microbatches_make_the_same_update_as_the_whole_batch(batches, microbatch):
    ref_params, ref_metrics = run_steps(0, batches)
    params, metrics = run_steps(microbatch, batches)
    assert max_rel_diff(params, ref_params) < 1e-5
    for m, r in zip(metrics, ref_metrics):
        for key in ("loss_sum", "correct", "count", "grad_norm"):
            assert abs(float(m[key]) - float(r[key])) <= 1e-5 * max(abs(float(r[key])), 1.0), key
    assert float(metrics[2]["count"]) == 5.0
    first, _ = run_steps(0, batches[:1])
    assert max_rel_diff(first, ref_params) > 1e-4  # the later steps did move the parameters


def test_a_microbatch_that_does_not_divide_the_local_batch_is_a_clear_error(store, tmp_path):
    assert num_microbatches(8, 0) == 1 and num_microbatches(8, 8) == 1 and num_microbatches(8, 2) == 4
    for bad in (3, 16, -2):
        with pytest.raises(ValueError, match=f"train.microbatch={bad} does not divide the local batch of 8"):
            num_microbatches(8, bad)
    config = load_config(TINY, [f"data.store={store}", "train.microbatch=3"])
    with pytest.raises(
        ValueError,
        match=r"train.microbatch=3 does not divide the local batch of 8 images per rank "
        r"\(train.global_batch=8 / 1 MPI rank\(s\)\)",
    ):
        train_and_evaluate(config, tmp_path)


def test_a_run_in_microbatches_trains_checkpoints_and_resumes_as_one_without(store, tmp_path):
    """3 steps in micro-batches of 2, then resumed without micro-batches up to 5 = 5 steps without micro-batches."""
    common = [f"data.store={store}", "train.checkpoint_every_steps=1"]
    ref = train_and_evaluate(load_config(TINY, [*common, "train.max_steps=5"]), tmp_path / "ref")
    first = train_and_evaluate(
        load_config(TINY, [*common, "train.max_steps=3", "train.microbatch=2"]), tmp_path / "micro"
    )
    assert first["final_step"] == 3
    assert max_rel_diff(load_model(tmp_path / "micro", 3)[1], load_model(tmp_path / "ref", 3)[1]) < 1e-5
    resumed = train_and_evaluate(load_config(TINY, [*common, "train.max_steps=5"]), tmp_path / "micro")
    assert resumed["start_step"] == 3 and resumed["final_step"] == 5
    assert max_rel_diff(resumed["params"], ref["params"]) < 1e-5
    assert resumed["final_val_accuracy"] == pytest.approx(ref["final_val_accuracy"])
