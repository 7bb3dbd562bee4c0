"""BBBC021 at full resolution (1024x1280, DAPI / tubulin / actin) with the published CPU recipe.

Nesterov momentum 0.9; the learning rate warms up linearly from 0.001 to 0.008 (at a global batch of 32,
scaled linearly with the global batch) over 5 epochs, then decays linearly to 1e-4; label smoothing 0.1;
weight decay 5e-5. Import the data once, then train (leave-one-compound-out: hold out one compound):

    mcnn-data bbbc021 --metadata /data/BBBC021 --images /data/BBBC021 --check   # README: getting BBBC021
    mcnn-data bbbc021 --metadata /data/BBBC021 --images /data/BBBC021 --out /data/bbbc021.store
    mpiexec -n 8 mcnn-train --config configs/bbbc021.py --workdir runs/bbbc021 \\
        --config.data.store=/data/bbbc021.store --config.data.split=compound --config.data.holdout_compound=taxol
"""

from mcnn_jax.config import base_config


def get_config():
    c = base_config()
    c.data.store = "/data/bbbc021.store"
    c.data.split = "random"  # or "compound" with data.holdout_compound (leave-one-compound-out)
    c.data.val_fraction = 0.2
    c.model.input_shape = (1024, 1280, 3)
    c.model.num_classes = 13
    # the optimizer: base_config's, which is the published recipe (mcnn_jax.config.PUBLISHED_RECIPE)
    c.optim.epochs = 50.0
    c.train.global_batch = 32
    c.train.eval_every_epochs = 1.0
    c.train.target_accuracy = 0.0
    return c
