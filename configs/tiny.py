"""A tiny run for tests and smoke checks: 64 synthetic 128x128 images, a thin M-CNN, a few steps.

mcnn-train --config configs/tiny.py --workdir /tmp/tiny
"""

from mcnn_jax.config import base_config


def get_config():
    c = base_config()
    c.data.synthetic.enabled = True
    c.data.synthetic.num_images = 48
    c.data.synthetic.num_classes = 4
    c.data.synthetic.height = 128
    c.data.synthetic.width = 128
    c.data.augment.rot90 = True
    c.model.input_shape = (128, 128, 3)
    c.model.widths = (2, 2, 2, 4, 4, 4, 4)
    c.model.merge_width = 16
    c.model.head_width = 16
    c.optim.base_lr = 0.01
    c.optim.warmup_epochs = 1.0
    c.optim.epochs = 2.0
    c.train.global_batch = 8
    c.train.max_steps = 2
    c.train.eval_every_epochs = 1.0
    c.train.log_every_steps = 1
    return c
