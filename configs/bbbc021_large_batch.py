"""BBBC021 at full resolution on 8 nodes x 32 images (global batch 256, 16x the study's base batch of 16), with
the recipe that came closest to its base batch's accuracy at 16x in the large-batch study
(benchmarks/study_large_batch.py; README: "Large global batches"): AdamW with the linear scaling rule (base_lr
0.002 at a batch of 16, so a peak of 0.032 at 256), a 5-epoch linear warmup from a tenth of the peak, cosine decay
to a hundredth of it, over 40 epochs; label smoothing 0.1 and (decoupled) weight decay 5e-5 on the kernels, as in
the published recipe. It did NOT meet the 1-point goal: over five seeds it was 3.0 points below its own base batch
on average (66.3% against 69.3%), and its seeds varied more (62.4-70.8%). At 4x the same recipe kept its
base's accuracy: configs/bbbc021_batch64.py; a batch that grows to 256 during training kept it too:
configs/bbbc021_growing_batch.py.

Each rank takes its 32 images in micro-batches of 8 (7.2 GB peak at 1024x1280x3, benchmarks/bench_microbatch.py)
and the ranks exchange gradients once per step ("auto": per dense layer the exact scheme that sends fewer bytes).
The learning rates are the study's (at a reduced field size, on a synthetic screen): a starting point for
BBBC021, not tuned on it. Time to accuracy on N nodes: `python benchmarks/time_to_accuracy.py`.

    mpiexec -n 8 mcnn-train --config configs/bbbc021_large_batch.py --workdir runs/bbbc021_large_batch \\
        --config.data.store=/data/bbbc021.store
    sbatch --nodes=8 launch/slurm.sbatch configs/bbbc021_large_batch.py runs/bbbc021_large_batch \\
        --config.data.store=/shared/bbbc021.store      # 2 ranks per node: 16 images each, 2 micro-batches of 8
"""

from pathlib import Path

from mcnn_jax.config import config_module
from mcnn_jax.optim import scaled_lr


def get_config(nodes: int = 8, images_per_node: int = 32):
    """The recipe at a global batch of ``nodes x images_per_node`` (configs/bbbc021_batch64.py: 4 x 16)."""
    c = config_module(Path(__file__).with_name("bbbc021.py")).get_config()  # its data and model; optimizer below
    c.optim.update(
        name="adamw",
        b1=0.9,
        b2=0.999,
        lr_scaling="linear",
        base_lr=0.002,
        base_batch=16,
        warmup_epochs=5.0,
        decay="cosine",
        epochs=40.0,
    )
    c.train.global_batch = nodes * images_per_node
    peak = scaled_lr(c.optim.base_lr, c.train.global_batch, c.optim.base_batch, c.optim.lr_scaling)
    c.optim.update(warmup_init_lr=peak / 10, end_lr=peak / 100)
    c.train.microbatch = 8
    c.train.comm = "auto"
    c.train.eval_every_epochs = 1.0
    return c
