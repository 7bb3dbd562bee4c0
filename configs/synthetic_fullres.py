"""The synthetic screen at full resolution (1024x1280x3), with the published M-CNN and CPU recipe.

Generates the screen into ``<workdir>/data`` on first use (about 1 s per field; see benchmarks/), then trains.

    mcnn-train --config configs/synthetic_fullres.py --workdir runs/synthetic_fullres
    mpiexec -n 2 mcnn-train --config configs/synthetic_fullres.py --workdir runs/synthetic_fullres
"""

from mcnn_jax.config import base_config


def get_config():
    c = base_config()  # the published M-CNN and optimizer recipe are its defaults
    c.data.synthetic.enabled = True
    c.data.synthetic.num_images = 520
    c.data.synthetic.num_classes = 13
    c.data.synthetic.height = 1024
    c.data.synthetic.width = 1280
    c.model.input_shape = (1024, 1280, 3)
    c.optim.warmup_epochs = 2.0
    c.optim.epochs = 20.0
    c.train.global_batch = 16
    c.train.target_accuracy = 0.95
    return c
