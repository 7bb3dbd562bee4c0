"""The trainer's pieces: throughput without compilation, the NaN message before any checkpoint, the profile
trace, GFLOP/s, per-rank logs, optimizer names, config defaults, the rank-0 checkpointer, the progress helper."""

import json
import logging as pylogging
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging

from mcnn_jax import optim
from mcnn_jax.checkpoint import Checkpointer, NullCheckpointer, rank_checkpointer
from mcnn_jax.config import base_config, load_config
from mcnn_jax.metrics_log import Progress, track
from mcnn_jax.model.flops import mcnn_flops
from mcnn_jax.model.mcnn import MCNN, MODEL_KEYS, from_config
from mcnn_jax.parallel.world import World
from mcnn_jax.runtime import cache_dir, enable_compilation_cache, setup_logging
from mcnn_jax.train import Chrono, itstime, train_and_evaluate

enable_compilation_cache()

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def test_steady_images_per_s_excludes_the_first_step_and_compile_time_is_apart(store, tmp_path):
    config = load_config(TINY, [f"data.store={store}", "train.max_steps=4", "train.profile_steps=(2, 3)"])
    summary = train_and_evaluate(config, tmp_path)
    train = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    steady = sum(r["data_wait_s"] + r["step_s"] for r in train[1:])
    assert summary["images_per_s"] == pytest.approx(3 * 8 / steady, rel=1e-3)
    assert 0 < summary["compile_s"] <= summary["first_step_s"]
    assert summary["first_step_s"] == pytest.approx(train[0]["data_wait_s"] + train[0]["step_s"], rel=1e-3)
    # the rate over all steps, the first (compiling) one included, is lower than the steady rate reported
    assert summary["images_per_s"] > 4 * 8 / sum(r["data_wait_s"] + r["step_s"] for r in train)
    # GFLOP/s: training FLOPs per image x images / step time
    flops = mcnn_flops(from_config(config.model, num_classes=4), 128, 128, 3)["train"]
    assert train[2]["gflop_per_s"] == pytest.approx(flops * 8 / train[2]["step_s"] / 1e9, rel=1e-6)
    assert "allreduce_s" not in train[0]  # one rank: no allreduce to time
    assert list((tmp_path / "profile" / "rank0").rglob("*.xplane.pb")), "no profiler trace written"
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "rank 0/1" in log and "step 4/4" in log


def test_nan_before_the_first_checkpoint_says_none_exists_and_what_to_change(store, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "mcnn_jax.cli.train",
        "--config",
        TINY,
        "--workdir",
        str(tmp_path),
        f"--config.data.store={store}",
        "--config.train.max_steps=50",
        "--config.train.checkpoint_every_steps=100",
        "--config.train.eval_every_epochs=100.0",
        "--config.optim.base_lr=1e30",
        "--config.optim.warmup_init_lr=1e30",
        "--config.optim.name=momentum",
        "--config.optim.momentum=0.0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "No checkpoint exists yet" in out and "step None" not in out, out
    for key in ("optim.base_lr", "optim.warmup_epochs", "optim.grad_clip"):
        assert key in out
    assert not (tmp_path / "checkpoints").exists() or not Checkpointer(tmp_path, write=False).steps()


def test_itstime_and_chrono():
    assert [s for s in range(1, 11) if itstime(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 4) if itstime(s, 0, 3)] == [3]
    chrono = Chrono(global_batch=8)
    assert chrono.images_per_s is None
    chrono.record(0.5, 9.5)  # the first step (compile and warm-up)
    chrono.record(0.1, 0.9)
    chrono.record(0.0, 1.0)
    assert chrono.images_per_s == pytest.approx(16 / 2.0)
    assert chrono.summary()["first_step_s"] == 10.0
    assert chrono.summary()["data_wait_fraction"] == pytest.approx(0.6 / 12.0)
    # a later step that compiles (the first of a new train.batch_schedule phase, 32 images) counts as compile time
    # and is left out of the steady rate; compilation between steps (an evaluation's) is not the step's
    from mcnn_jax import train as train_module

    compiled = chrono.compile_s
    chrono.begin()
    train_module._compile_seconds[0] += 4.0
    chrono.record(0.0, 5.0, images=32)
    assert chrono.compile_s == pytest.approx(compiled + 4.0) and chrono.images_per_s == pytest.approx(8.0)
    train_module._compile_seconds[0] += 2.0  # e.g. the evaluation's step, compiled between two training steps
    chrono.begin()
    chrono.record(0.0, 1.0, images=32)
    assert chrono.compile_s == pytest.approx(compiled + 4.0)
    assert chrono.images_per_s == pytest.approx((16 + 32) / 3.0)


def test_each_rank_logs_to_its_own_file_and_warnings_reach_stderr(tmp_path, capsys):
    path = setup_logging(tmp_path, rank=1, size=2)
    try:
        logging.info("progress of rank one")
        logging.warning("rank one saw something odd")
        pylogging.getLogger("absl").handlers[0].flush()
        out, err = capsys.readouterr()
        text = path.read_text()
        assert path == tmp_path / "logs" / "rank1.log"
        assert "progress of rank one" in text and "rank one saw something odd" in text
        assert "progress of rank one" not in out  # only rank 0 prints progress to the terminal
        assert "[rank 1] warning: rank one saw something odd" in err
    finally:
        setup_logging()


def _updates(name, **kw):
    cfg = base_config().optim
    cfg.update(dict(name=name, **kw))
    tx = optim.make_optimizer(cfg, optax.constant_schedule(0.1))
    p = {"k": jnp.ones((2, 2)), "b": jnp.ones(2)}
    g = {"k": jnp.full((2, 2), 0.5), "b": jnp.full(2, 0.25)}
    state = tx.init(p)
    u1, state = tx.update(g, state, p)
    u2, _ = tx.update(g, state, p)
    return u2


def test_optimizer_names_say_what_runs_and_old_sgd_is_read_as_what_it_ran():
    nesterov, momentum = _updates("nesterov"), _updates("momentum")
    assert not np.allclose(nesterov["k"], momentum["k"])
    assert np.array_equal(_updates("sgd", nesterov=True)["k"], nesterov["k"])  # the old default
    assert np.array_equal(_updates("sgd", nesterov=False)["k"], momentum["k"])
    assert np.array_equal(_updates("nesterov", nesterov=False)["k"], nesterov["k"])  # the name decides
    with pytest.raises(ValueError, match="lars, nesterov, momentum, adamw"):
        _updates("sgdd")
    assert base_config().optim.name == "nesterov"


def test_model_keys_and_defaults_come_from_mcnn():
    fields = {f for f in MCNN.__dataclass_fields__ if f not in ("parent", "name")}
    assert set(MODEL_KEYS) == fields
    model = base_config().model
    for key in MODEL_KEYS:
        default = getattr(MCNN, key)
        assert model[key] == (jnp.dtype(default).name if key == "dtype" else default), key
    assert from_config(model) == MCNN()


def test_rank_zero_owns_the_checkpoints(tmp_path):
    other = rank_checkpointer(tmp_path, World(rank=1, size=2))
    assert isinstance(other, NullCheckpointer) and other.resolve("latest") is None
    state = {"w": np.ones(3)}
    assert other.restore(5, state)[0] is state
    other.save(state, {})
    assert not (tmp_path / "checkpoints").exists()
    primary = rank_checkpointer(tmp_path, World())
    assert isinstance(primary, Checkpointer) and primary.resolve("latest") is None
    primary.close()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir("xla") == tmp_path / "mcnn-jax" / "xla"
    monkeypatch.setenv("MY_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir("native", env="MY_CACHE") == tmp_path / "elsewhere"


def test_progress_logs_lines_at_tenths_or_every_n(tmp_path):
    path = setup_logging(tmp_path)
    try:
        assert list(track(range(20), 20, "import", unit="image")) == list(range(20))
        p = Progress(6, mode="log", every=3)
        for step in range(1, 7):
            p.set(step, loss=1.0 / step)
        text = path.read_text()
        assert text.count("import: image ") == 10 and "import: image 20/20" in text
        assert "step 3/6 | loss 0.3333" in text and "step 6/6" in text and "step 4/6" not in text
    finally:
        setup_logging()
