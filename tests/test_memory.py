"""``mcnn_jax.memory.estimate`` and ``mcnn-train --dry-run``: the peak memory of a config, before it runs."""

import json
import subprocess
import sys
from pathlib import Path

from mcnn_jax.config import load_config
from mcnn_jax.memory import BASELINE_BYTES, TRAINER_BYTES, describe, estimate

ROOT = Path(__file__).resolve().parents[1]


def _config(**model):
    c = load_config(str(ROOT / "configs" / "tiny.py"))
    c.model.num_classes = 4
    c.model.widths = (16, 16, 16, 4, 4, 4, 4)
    for k, v in model.items():
        setattr(c.model, k, v)
    return c


def test_the_estimate_follows_the_batch_the_micro_batch_and_streaming():
    c = _config(input_shape=(512, 512, 3), head="global_max")
    c.train.global_batch = 4
    whole = estimate(c)
    assert whole["peak_bytes"] == BASELINE_BYTES + TRAINER_BYTES + whole["bytes"]["data_pipeline"] + max(
        whole["bytes"]["train_step"], whole["bytes"]["eval_step"]
    )
    assert whole["bytes"]["data_pipeline"] == (c.data.prefetch + 1) * 4 * 512 * 512 * 3 * 4
    c.train.microbatch = 1
    micro = estimate(c)["bytes"]["train_step"]
    c.model.stream_tile = 128
    streamed = estimate(c)["bytes"]["train_step"]
    # the full-resolution branches' activations dominate: a quarter of the batch at a time, then one tile
    assert micro < 0.5 * whole["bytes"]["train_step"] and streamed < 0.5 * micro, (whole, micro, streamed)
    assert estimate(c, ranks=2)["local_batch"] == 2
    assert "expected peak memory per rank" in describe(whole)


def test_dry_run_prints_the_estimate_and_trains_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mcnn_jax.cli.train", "--config", str(ROOT / "configs" / "montage.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "expected peak memory per rank" in proc.stdout and "512x640x3" in proc.stdout
    est = json.loads(proc.stdout.strip().splitlines()[-1])
    assert est["stream_tile"] == 256 and est["peak_bytes"] > BASELINE_BYTES
    assert list(tmp_path.iterdir()) == []  # no work directory, no data generated
