"""The store a config trains on: ``data.store``, or the synthetic screen generated into the work directory.

from mcnn_jax.data.prepare import prepare_store, store_path
store = prepare_store(config, workdir, world)   # every rank; rank 0 generates a synthetic screen first
"""

from __future__ import annotations

from pathlib import Path

from absl import logging

from mcnn_jax.data.store import open_store
from mcnn_jax.data.synthetic import Camera, prepare_synthetic_store


def store_path(config, workdir) -> Path:
    """``data.store``, or ``<workdir>/data/store`` when it is empty."""
    return Path(config.data.store) if config.data.store else Path(workdir) / "data" / "store"


def prepare_store(config, workdir, world):
    """Opens the config's store; with ``data.synthetic.enabled`` and no ``data.store``, rank 0 first generates
    the synthetic screen into ``<workdir>/data`` (once: a complete store is reused) while the others wait."""
    syn = config.data.synthetic
    if syn.enabled and not config.data.store:
        if world.is_primary:
            logging.info(
                f"preparing the synthetic screen ({syn.num_images} images, {syn.num_classes} classes, "
                f"{syn.height}x{syn.width}) in {Path(workdir) / 'data'}"
            )
            prepare_synthetic_store(
                Path(workdir) / "data",
                num_images=syn.num_images,
                num_classes=syn.num_classes,
                height=syn.height,
                width=syn.width,
                seed=syn.seed,
                camera=Camera(syn.background, syn.saturation, syn.bits),
                difficulty=syn.difficulty,
            )
        world.barrier()
    path = store_path(config, workdir)
    if not path.exists():
        raise FileNotFoundError(
            f"no image store at {path}: import one first (mcnn-data bbbc021|folder|synthetic ... --out {path}) "
            f"or set --config.data.store"
        )
    return open_store(path)
