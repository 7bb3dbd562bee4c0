"""BBBC021 at full resolution on 16 nodes, with a global batch that grows with the gradient noise scale: 16 images
(1 per node) for epochs 0-10, 64 (4 per node) for epochs 10-20 and 256 (16 per node, 16x the large-batch study's
base batch) for the last 20 epochs (``train.batch_schedule``). The recipe is the study's AdamW one
(configs/bbbc021_large_batch.py: the linear scaling rule from base_lr 0.002 at a batch of 16, a 5-epoch warmup from
a tenth of the peak, cosine decay to a hundredth of it over 40 epochs), each phase at its own batch's learning rate.
In the large-batch study (benchmarks/study_large_batch.py, the run ``adamw_b256_ramp``; README: "Large global
batches") this schedule kept the base batch's accuracy where a constant batch of 256 did not: 70.4% best
validation accuracy over five seeds, against 69.3% at a constant 16 and 66.3% at a constant 256, in 2,800 updates
(8,200 at 16). The batch grows where the measured gradient noise scale does (benchmarks/measure_noise_scale.py).

Each rank takes its whole local batch in one micro-batch (train.microbatch=0: 1, 4 then 16 images, about 9 GB at
16 images of 1024x1280x3; a micro-batch must divide every phase's local batch). The learning rates are the study's
(a synthetic screen at a reduced field size): a starting point for BBBC021, not tuned on it. Time to accuracy:
`python benchmarks/time_to_accuracy.py --recipe adamw --target own --node-batch 16`.

    mpiexec -n 16 mcnn-train --config configs/bbbc021_growing_batch.py --workdir runs/bbbc021_growing_batch \\
        --config.data.store=/data/bbbc021.store
    sbatch --nodes=16 --ntasks-per-node=1 launch/slurm.sbatch configs/bbbc021_growing_batch.py \\
        runs/bbbc021_growing_batch --config.data.store=/shared/bbbc021.store   # 1 rank per node: 16 divides 16
"""

from pathlib import Path

from mcnn_jax.config import config_module

SCHEDULE = ((0, 16), (10, 64), (20, 256))  # (start epoch, global batch): the study's --ramp


def get_config():
    c = config_module(Path(__file__).with_name("bbbc021_large_batch.py")).get_config(nodes=16, images_per_node=16)
    c.train.batch_schedule = SCHEDULE
    c.train.microbatch = 0
    return c
