"""A five-channel Cell Painting screen (DNA, ER, RNA, AGP, Mito) with the published M-CNN and CPU recipe.

Import the screen once (a real one from its table, e.g. ``mcnn-data manifest --index load_data.csv --out STORE
--crop 1024 1024 --label Metadata_MoA``, see the README's "Your own screen, any number of channels"; or the synthetic
Cell-Painting-like
screen), then train. The M-CNN takes fields whose sides are multiples of 128, hence the crop of 1080x1080
fields, and the synthetic screen is generated at 1024x1024:

    mcnn-data synthetic --channels 5 --out /data/cellpainting --images 640 --classes 8 --height 1024 \\
        --width 1024 --store /data/cellpainting.store
    mcnn-train --config configs/cellpainting.py --workdir runs/cellpainting \\
        --config.data.store=/data/cellpainting.store
"""

from mcnn_jax.config import base_config, published_recipe


def get_config():
    c = published_recipe(base_config())
    c.data.store = "/data/cellpainting.store"
    c.data.split = "random"  # or "compound" with data.holdout_compound (the table's Metadata_Compound)
    c.data.val_fraction = 0.2
    c.data.augment.rot90 = True  # square fields
    c.model.input_shape = (1024, 1024, 5)  # must match the store: the trainer names the value to set if not
    c.optim.warmup_epochs = 2.0
    c.optim.epochs = 20.0
    c.train.global_batch = 16
    c.train.eval_every_epochs = 1.0
    c.train.target_accuracy = 0.9
    return c
