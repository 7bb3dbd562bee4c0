"""The full set of config keys every experiment has, with defaults. Config files in ``configs/`` start from
``base_config()``, change what they need, and return it locked, so a misspelt key is an error."""

from __future__ import annotations

import ml_collections

from .models import PUBLISHED_POOL_FACTORS, PUBLISHED_POST_POOLS, PUBLISHED_WIDTHS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- data: a TensorStore image store (see mcnn_jax.data) --------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.store = ""  # path of the store; "" means <workdir>/data/store
    c.data.synthetic = ml_collections.ConfigDict()  # generated into the workdir when the store is absent
    c.data.synthetic.enabled = False
    c.data.synthetic.num_images = 0
    c.data.synthetic.num_classes = 0
    c.data.synthetic.height = 1024
    c.data.synthetic.width = 1280
    c.data.synthetic.seed = 0
    c.data.split = "random"  # "random" (seeded, stratified) or "compound" (leave one compound out)
    c.data.val_fraction = 0.2
    c.data.holdout_compound = ""  # with split="compound": the compound whose images are the validation set
    c.data.split_seed = 0
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.flips = True
    c.data.augment.rot180 = True
    c.data.augment.rot90 = False  # only for square images
    c.data.augment.intensity_jitter = 0.05
    c.data.prefetch = 2

    # --- model: the M-CNN (mcnn_jax.models.MCNN) ---------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.num_classes = 13  # replaced by the store's number of classes at run time
    c.model.input_shape = (1024, 1280, 3)
    c.model.pool_factors = PUBLISHED_POOL_FACTORS
    c.model.widths = PUBLISHED_WIDTHS
    c.model.post_pools = PUBLISHED_POST_POOLS
    c.model.convs_per_branch = 3
    c.model.kernel_size = 5
    c.model.merge_width = 1024
    c.model.merge_pool = 2
    c.model.head_width = 512
    c.model.norm = "none"
    c.model.norm_groups = 8
    c.model.dtype = "float32"
    c.model.remat = False

    # --- optimizer and schedule (mcnn_jax.optim); durations in epochs ------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "nesterov"  # lars | sgd | nesterov | adamw
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-5
    c.optim.trust_coefficient = 0.001  # LARS
    c.optim.eps = 1e-8
    c.optim.b1 = 0.9  # AdamW
    c.optim.b2 = 0.999
    c.optim.base_lr = 0.008  # peak learning rate at base_batch; scaled linearly to the global batch
    c.optim.base_batch = 32
    c.optim.warmup_init_lr = 0.001
    c.optim.warmup_epochs = 5.0
    c.optim.decay = "linear"  # linear | cosine | polynomial | step | constant
    c.optim.end_lr = 1e-4
    c.optim.power = 2.0
    c.optim.step_epochs = (30.0, 60.0)
    c.optim.step_gamma = 0.1
    c.optim.label_smoothing = 0.1
    c.optim.epochs = 50.0
    c.optim.grad_clip = 0.0  # global-norm clipping; 0 = off

    # --- training loop -----------------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.global_batch = 32  # over all MPI ranks; each rank takes global_batch / ranks
    c.train.max_steps = 0  # stop after this many steps (0 = the epochs' worth)
    c.train.eval_every_epochs = 1.0
    c.train.eval_batch = 0  # per rank; 0 = the per-rank training batch
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 0  # 0 = at every evaluation
    c.train.keep_checkpoints = 3
    c.train.target_accuracy = 0.0  # stop when validation accuracy reaches it (0 = off)
    c.train.progress = "auto"  # auto (a bar on a terminal) | bar | log
    return c
