"""Data parallelism under ``mpiexec -n 2``: equivalence with one rank, N -> M rank resume, failing ranks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mcnn_jax.evaluation.run import load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
pytestmark = pytest.mark.mpi


def mpiexec():
    exe = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
    assert Path(exe).exists(), "mpiexec not found: install with launch/install.sh (the mpich wheel brings it)"
    return exe


def train(workdir, store, ranks, *overrides, timeout=600):
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
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def one_rank(store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_rank")
    train(workdir, store, 1, "train.max_steps=5", "train.checkpoint_every_steps=1")
    return workdir


def max_rel_diff(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max() / (np.abs(np.asarray(y)).max() + 1e-12))
        for x, y in zip(la, lb)
    )


def test_two_ranks_equal_one_rank_with_twice_the_batch(store, one_rank, tmp_path):
    """2 ranks x 4 images = 1 rank x 8 images (the global batch is 8 in both): same parameters after 5 steps."""
    proc = train(tmp_path, store, 2, "train.max_steps=5", "train.checkpoint_every_steps=1")
    assert "2 rank(s) x 4 images = global batch 8" in proc.stdout
    two, one = load_model(tmp_path, "latest"), load_model(one_rank, "latest")
    assert two[2]["step"] == one[2]["step"] == 5 and two[2]["ranks"] == 2
    assert max_rel_diff(two[1], one[1]) < 1e-5
    assert max_rel_diff(one[1], load_model(one_rank, 3)[1]) > 1e-3  # and the parameters did change
    # only rank 0 wrote: one metrics file, with one line per step
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4, 5]


def test_two_ranks_in_microbatches_equal_one_rank_with_the_whole_batch(store, one_rank, tmp_path):
    """2 ranks x (2 micro-batches of 2 images) = 1 rank x 8 images: micro-batching changes nothing but memory."""
    proc = train(tmp_path, store, 2, "train.max_steps=5", "train.checkpoint_every_steps=1", "train.microbatch=2")
    assert "2 rank(s) x 4 images = global batch 8" in proc.stdout
    assert max_rel_diff(load_model(tmp_path, "latest")[1], load_model(one_rank, "latest")[1]) < 1e-5


STREAMED = ("model.stream_tile=64", "model.stream_branches=-1")


def test_two_ranks_streamed_equal_one_rank_unstreamed(store, one_rank, tmp_path):
    """model.stream_tile=64 (every branch in 2x2 tiles) on 2 ranks: the unstreamed 1-rank run's parameters; the
    checkpoint loads as any other and its streamed model gives the unstreamed model's logits."""
    train(tmp_path, store, 2, "train.max_steps=5", "train.checkpoint_every_steps=1", *STREAMED)
    model, params, meta = load_model(tmp_path, "latest")
    plain, one, _ = load_model(one_rank, "latest")
    assert meta["step"] == 5 and model.stream_tile == 64 and plain.stream_tile == 0
    assert max_rel_diff(params, one) < 1e-5
    x = np.random.default_rng(0).random((2, 128, 128, 3), np.float32)
    assert max_rel_diff(jax.jit(model.apply)({"params": params}, x), jax.jit(plain.apply)({"params": params}, x)) < 1e-5


def test_checkpoint_of_two_ranks_resumes_on_one(store, one_rank, tmp_path):
    train(tmp_path, store, 2, "train.max_steps=3", "train.checkpoint_every_steps=1")
    proc = train(tmp_path, store, 1, "train.max_steps=5", "train.checkpoint_every_steps=1")
    assert "resuming from the checkpoint of step 3" in proc.stdout
    assert max_rel_diff(load_model(tmp_path, "latest")[1], load_model(one_rank, "latest")[1]) < 1e-5


def test_a_growing_batch_on_two_ranks_equals_one_rank(store, tmp_path):
    """train.batch_schedule 4 -> 8 images: 2 ranks x 2 then x 4 = 1 rank x 4 then x 8, across the phase change."""
    keys = (
        "train.max_steps=0",
        "optim.epochs=2.0",
        "train.batch_schedule=((0, 4), (1, 8))",
        "train.checkpoint_every_steps=1",
    )
    train(tmp_path / "one", store, 1, *keys)
    proc = train(tmp_path / "two", store, 2, *keys)
    assert "global batch 4 from epoch 0" in proc.stdout and "the global batch grows to 8" in proc.stdout
    one, two = load_model(tmp_path / "one", "latest"), load_model(tmp_path / "two", "latest")
    assert two[2]["step"] == one[2]["step"] > 10 and two[2]["ranks"] == 2
    assert max_rel_diff(two[1], one[1]) < 1e-5


def test_global_batch_not_divisible_by_ranks_is_a_clear_error(store, tmp_path):
    cmd = [
        mpiexec(),
        "-n",
        "2",
        sys.executable,
        "-m",
        "mcnn_jax.cli.train",
        "--config",
        TINY,
        "--workdir",
        str(tmp_path),
        f"--config.data.store={store}",
        "--config.train.global_batch=7",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "global_batch=7 is not divisible by the 2 MPI ranks" in proc.stdout + proc.stderr


def test_a_rank_that_raises_stops_the_whole_job(tmp_path):
    t0 = time.time()
    proc = subprocess.run(
        [mpiexec(), "-n", "2", sys.executable, str(ROOT / "tests" / "mpi_fault.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.time() - t0 < 60, "the job took more than 60 s to stop"
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rank 1 could not read images/bad.tif" in out and "[rank 1/2] failed" in out


def test_a_killed_rank_stops_the_whole_job(store, tmp_path):
    cmd = [
        mpiexec(),
        "-n",
        "2",
        sys.executable,
        "-m",
        "mcnn_jax.cli.train",
        "--config",
        TINY,
        "--workdir",
        str(tmp_path),
        f"--config.data.store={store}",
        "--config.train.max_steps=100000",
        "--config.train.eval_every_epochs=100000.0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.is_file() and '"train"' in metrics.read_text()):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        # the rank-1 python process: a child of the launcher whose environment says PMI_RANK=1
        victim = None
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes()
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"PMI_RANK=1\0" in env and b"mcnn_jax.cli.train" in cmdline and str(tmp_path).encode() in cmdline:
                    victim = int(pid)
        assert victim, "rank 1 not found"
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=60)
        assert time.time() - t0 < 60
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_allreduce_time_gflops_and_per_rank_logs(store, tmp_path):
    """Under 2 ranks: metrics.jsonl has the separately timed allreduce and GFLOP/s; each rank has its log."""
    train(tmp_path, store, 2, "train.max_steps=2")
    train_records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["step"] for r in train_records] == [1, 2]
    assert all(0 < r["allreduce_s"] < r["step_s"] + 1.0 and r["gflop_per_s"] > 0 for r in train_records)
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank}/2" in log and "global batch 8" in log
