"""The trainer end to end on the tiny config: a run, resume = uninterrupted bit for bit, kill -9 and resume,
SIGTERM, a NaN stop, a bad config key, evaluation from a checkpoint."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mcnn_jax.config import load_config
from mcnn_jax.evaluation.evaluate import evaluate_checkpoint
from mcnn_jax.evaluation.run import load_model
from mcnn_jax.runtime import enable_compilation_cache
from mcnn_jax.train import train_and_evaluate

enable_compilation_cache()

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def tiny(store, *overrides):
    return load_config(TINY, [f"data.store={store}", *overrides])


def cli(workdir, store, *overrides, **kw):
    cmd = [
        sys.executable,
        "-m",
        "mcnn_jax.cli.train",
        "--config",
        TINY,
        "--workdir",
        str(workdir),
        f"--config.data.store={store}",
        *[f"--config.{o}" for o in overrides],
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def final_params(workdir):
    return load_model(workdir, "latest")[1]


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    """Six steps without a stop: the reference for the resume tests."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    summary = train_and_evaluate(tiny(store, "train.max_steps=6", "train.checkpoint_every_steps=1"), workdir)
    return workdir, summary


def test_two_step_run_end_to_end(tmp_path):
    """The CLI on the tiny config, generating its synthetic data: metrics, TensorBoard, checkpoint, summary."""
    proc = subprocess.run(
        [sys.executable, "-m", "mcnn_jax.cli.train", "--config", TINY, "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_step"] == 2 and summary["steps_run"] == 2
    assert 0.0 <= summary["final_val_accuracy"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    val = [r for r in records if r["split"] == "val"]
    assert val and len(val[-1]["confusion"]) == 4 and len(val[-1]["per_class_accuracy"]) == 4
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert "step 2/2" in proc.stdout  # plain log lines when not on a terminal


def test_resume_equals_uninterrupted_bit_for_bit(store, uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    train_and_evaluate(tiny(store, "train.max_steps=3", "train.checkpoint_every_steps=1"), tmp_path)
    summary = train_and_evaluate(tiny(store, "train.max_steps=6", "train.checkpoint_every_steps=1"), tmp_path)
    assert summary["start_step"] == 3 and summary["final_step"] == 6
    assert same_tree(summary["params"], final_params(ref_dir))
    assert not same_tree(final_params(ref_dir), load_model(ref_dir, 4)[1])  # training did move the weights


@pytest.fixture(scope="module")
def uninterrupted_cli(store, tmp_path_factory):
    """Six steps without a stop, by mcnn-train as the killed runs are (so compiled as they are: the tests' own
    process compiles at XLA's default level, the programs it starts at level 0; conftest.py)."""
    workdir = tmp_path_factory.mktemp("uninterrupted_cli")
    out, _ = cli(workdir, store, "train.max_steps=6", "train.checkpoint_every_steps=1").communicate(timeout=600)
    assert (workdir / "summary.json").is_file(), out
    return workdir


@pytest.mark.parametrize("kill_after", [1, 3])
def test_sigkill_and_resume_equals_uninterrupted(store, uninterrupted_cli, tmp_path, kill_after):
    ref_dir = uninterrupted_cli
    proc = cli(tmp_path, store, "train.max_steps=6", "train.checkpoint_every_steps=1")
    deadline = time.time() + 300
    ckpts = tmp_path / "checkpoints"
    # kill once the run has got at least `kill_after` steps in: the moment within the step is left to chance
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.is_dir() else []
        if steps and max(steps) >= kill_after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = cli(tmp_path, store, "train.max_steps=6", "train.checkpoint_every_steps=1")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "resuming from the checkpoint of step" in out
    assert same_tree(final_params(tmp_path), final_params(ref_dir))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(store, tmp_path):
    proc = cli(
        tmp_path, store, "train.max_steps=1000", "train.checkpoint_every_steps=1000", "train.eval_every_epochs=1000.0"
    )
    deadline = time.time() + 300
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"train"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    step = summary["preempted_at_step"]
    assert 2 <= step < 1000
    assert (tmp_path / "checkpoints" / str(step)).is_dir()
    assert int(load_model(tmp_path, "latest")[2]["step"]) == step


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(store, tmp_path):
    proc = cli(
        tmp_path,
        store,
        "train.max_steps=50",
        "train.checkpoint_every_steps=1",
        "optim.base_lr=1e30",
        "optim.warmup_init_lr=1e30",
        "optim.name=sgd",
        "optim.momentum=0.0",
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 3, out
    assert "the training loss became nan" in out.lower() or "the training loss became inf" in out.lower(), out
    summary_missing = not (tmp_path / "summary.json").exists()
    assert summary_missing
    _, params, meta = load_model(tmp_path, "latest")
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree_util.tree_leaves(params))
    assert f"step {meta['step'] + 1}" in out  # it stopped at the step after the last good checkpoint


def test_bad_config_key_lists_the_valid_keys(store, tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'train.global_bach'.*Did you mean train.global_batch"):
        tiny(store, "train.global_bach=4")
    proc = cli(tmp_path, store, "optim.lr=0.1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'optim.lr'" in out and "optim.base_lr" in out and "train.global_batch" in out
    with pytest.raises(ValueError, match="takes a int"):
        tiny(store, "train.global_batch=abc")


def test_evaluation_from_a_checkpoint(store, uninterrupted):
    ref_dir, summary = uninterrupted
    result = evaluate_checkpoint(ref_dir, "latest")
    assert result["step"] == 6
    assert result["accuracy"] == pytest.approx(summary["final_val_accuracy"])
    assert np.asarray(result["confusion"]).sum() == result["count"] > 0
    proc = subprocess.run(
        [sys.executable, "-m", "mcnn_jax.cli.evaluate", "--workdir", str(ref_dir), "--checkpoint", "best"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "true \\ predicted" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mcnn_jax.cli.evaluate", "--workdir", str(ref_dir), "--checkpoint", "12345"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "no checkpoint of step 12345" in bad.stderr


def test_overlap_trains_the_same_parameters(store, uninterrupted, tmp_path):
    """``train.overlap=True`` through the trainer (one process: the background thread returns the copy): the
    uninterrupted run's parameters after 6 steps, within float32 rounding."""
    summary = train_and_evaluate(
        tiny(store, "train.max_steps=6", "train.checkpoint_every_steps=1", "train.overlap=True"), tmp_path
    )
    assert summary["final_step"] == 6
    ref = final_params(uninterrupted[0])
    for a, b in zip(jax.tree_util.tree_leaves(final_params(tmp_path)), jax.tree_util.tree_leaves(ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-12)


def test_target_accuracy_stops_and_reports_time_to_train(store, tmp_path):
    summary = train_and_evaluate(tiny(store, "train.max_steps=20", "train.target_accuracy=0.01"), tmp_path)
    assert summary["target_reached_at_step"] is not None and summary["final_step"] < 20
    assert 0 < summary["time_to_target_s"] <= summary["wall_s"]


def test_report_writes_plots(uninterrupted, tmp_path):
    from mcnn_jax.evaluation.plots import make_report

    written = make_report(uninterrupted[0], tmp_path)
    names = {p.name for p in written}
    assert {"curves_by_step.png", "curves_by_time.png", "learning_rate.png", "confusion.png"} <= names
    assert all(p.stat().st_size > 1000 for p in written)


def test_a_half_written_checkpoint_is_never_restored(store, uninterrupted, tmp_path):
    """A save cut short leaves only Orbax's temporary folder: resuming takes the previous complete step."""
    import shutil

    from mcnn_jax.checkpoint import Checkpointer

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    ckpts = workdir / "checkpoints"
    partial = ckpts / "7.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(ckpts / "6", partial)
    for f in partial.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated, as a killed writer leaves it
    assert Checkpointer(workdir, write=False).resolve("latest") == 6
    summary = train_and_evaluate(tiny(store, "train.max_steps=7", "train.checkpoint_every_steps=1"), workdir)
    assert summary["start_step"] == 6 and summary["final_step"] == 7


def test_eval_on_a_missing_store_is_a_clear_error(uninterrupted, tmp_path, capsys):
    from mcnn_jax.cli.evaluate import main as run

    (tmp_path / "not_a_store").mkdir()
    with pytest.raises(SystemExit) as e:
        run(["--workdir", str(uninterrupted[0]), "--store", str(tmp_path / "not_a_store")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "mcnn-eval: error:" in err and "not_a_store" in err and "Traceback" not in err
