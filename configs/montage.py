"""Whole-well montages: a small synthetic screen whose four 256x320 sites per well are stitched 2x2 into one
512x640 image per well, and a thin M-CNN trained on those (64 wells, 4 classes; a few minutes on 2 cores), its
three finest branches streamed in tiles of 256 pixels (model.stream_tile; docs/large-fields.md), as a whole
well of full-resolution fields would need.

The screen is generated into ``<workdir>/data/store`` on first use, its montage into
``<workdir>/data/montage-2x2-row`` (data.montage; docs/data.md, "Whole-well montages").

    mcnn-train --config configs/montage.py --workdir runs/montage
"""

from mcnn_jax.config import base_config


def get_config():
    c = base_config()
    c.data.synthetic.enabled = True
    c.data.synthetic.num_images = 256  # 64 wells of 4 sites (a multiple of 4 x num_classes: whole wells)
    c.data.synthetic.num_classes = 4
    c.data.synthetic.height = 256
    c.data.synthetic.width = 320
    c.data.synthetic.seed = 0
    c.data.montage.grid = "2x2"
    c.data.montage.order = "row"
    c.data.split = "random"
    c.data.val_fraction = 0.25
    c.data.augment.rot90 = False  # 512x640 montages are not square
    c.model.input_shape = (512, 640, 3)  # the montage: 2 x 256 by 2 x 320
    c.model.widths = (8, 8, 8, 16, 16, 16, 32)
    c.model.merge_width = 64
    c.model.head_width = 64
    c.model.stream_tile = 256  # exact: the same logits and gradients as unstreamed, in bounded memory
    c.model.stream_branches = 3
    c.optim.name = "adamw"
    c.optim.base_lr = 0.001
    c.optim.base_batch = 8
    c.optim.weight_decay = 1e-4
    c.optim.warmup_init_lr = 1e-4
    c.optim.warmup_epochs = 1.0
    c.optim.decay = "cosine"
    c.optim.end_lr = 1e-5
    c.optim.epochs = 6.0
    c.train.global_batch = 8
    c.train.eval_every_epochs = 1.0
    c.train.log_every_steps = 2
    return c
