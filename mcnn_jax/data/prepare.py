"""The store a config trains on: ``data.store``, or the synthetic screen generated into the work directory, or
with ``data.montage.grid`` the whole-well montage of either.

from mcnn_jax.data.prepare import prepare_store, store_path
store = prepare_store(config, workdir, world)   # every rank; rank 0 generates a synthetic screen / montage first

The montage store (``mcnn_jax.data.montage``) is ``data.montage.store`` if set; else, for ``data.store``, a folder
beside it (``<store>.montage-2x2-row``, ``-skip-incomplete`` appended with ``data.montage.skip_incomplete``), shared
by every run on that store, when that folder exists, or when the store's folder is writable and the work directory
holds no montage of its own; else (a synthetic screen, or a read-only store folder) ``<workdir>/data/montage-2x2-row``.
A complete montage store of other inputs is never replaced by the trainer: that is an error naming the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import logging

from mcnn_jax.data.montage import ORDERS, montage_name, montage_store, parse_grid
from mcnn_jax.data.store import StoreError, is_complete, open_store
from mcnn_jax.data.synthetic import SITES_PER_WELL, Camera, prepare_synthetic_store, whole_well_images


def source_path(config, workdir) -> Path:
    """``data.store``, or ``<workdir>/data/store`` when it is empty: the store of the fields themselves."""
    return Path(config.data.store) if config.data.store else Path(workdir) / "data" / "store"


def montage_path(config, workdir) -> Path:
    """Where the config's whole-well montage store lives (see the module docstring); ``data.montage.grid`` set.

    A montage that exists is found wherever it was built (beside the store, or in the work directory), so a run's
    readers (``mcnn-eval``, ``mcnn-embed``, LOCO) find the store it trained on whether or not the store's folder is
    writable where they run."""
    mont = config.data.montage
    if mont.store:
        return Path(mont.store)
    name = montage_name(mont.grid, mont.order) + ("-skip-incomplete" if mont.skip_incomplete else "")
    own = Path(workdir) / "data" / name
    if not config.data.store:
        return own
    src = Path(config.data.store)
    beside = src.parent / f"{src.name}.{name}"
    if beside.exists() or (not own.exists() and os.access(src.parent, os.W_OK)):
        return beside
    return own


def store_path(config, workdir) -> Path:
    """The store a config trains on: its montage store with ``data.montage.grid`` set, else ``source_path``."""
    return montage_path(config, workdir) if config.data.montage.grid else source_path(config, workdir)


def check_montage(mont) -> None:
    """ValueError naming the key if ``data.montage``'s grid or order is bad."""
    try:
        parse_grid(mont.grid)
    except ValueError as e:
        raise ValueError(f"data.montage.grid: {e}") from None
    if mont.order not in ORDERS:
        raise ValueError(f"data.montage.order must be one of {ORDERS}, got {mont.order!r}")


def synthetic_images(config) -> int:
    """``data.synthetic.num_images``; with a montage, rounded up so that every well has all its sites."""
    syn, grid = config.data.synthetic, config.data.montage.grid
    if not grid:
        return syn.num_images
    rows, cols = parse_grid(grid)
    if rows * cols != SITES_PER_WELL:
        raise ValueError(
            f"data.montage.grid={grid!r} has {rows * cols} sites a well, but the synthetic screen images "
            f"{SITES_PER_WELL} sites in every well: use 2x2, 1x4 or 4x1"
        )
    return whole_well_images(syn.num_images, syn.num_classes)


def prepare_store(config, workdir, world):
    """Opens the config's store; with ``data.synthetic.enabled`` and no ``data.store``, rank 0 first generates
    the synthetic screen into ``<workdir>/data`` (once: a complete store is reused) while the others wait. With
    ``data.montage.grid``, rank 0 then builds (or reuses) the montage store and that store is returned."""
    syn, mont = config.data.synthetic, config.data.montage
    if mont.grid:
        check_montage(mont)  # on every rank, before any work
    if syn.enabled and not config.data.store:
        num_images = synthetic_images(config)
        if world.is_primary:
            if num_images != syn.num_images:
                logging.info(
                    f"data.synthetic.num_images={syn.num_images} rounded up to {num_images} so that every well "
                    f"has its {SITES_PER_WELL} sites (a multiple of {SITES_PER_WELL} x {syn.num_classes} classes)"
                )
            logging.info(
                f"preparing the synthetic screen ({num_images} images, {syn.num_classes} classes, "
                f"{syn.height}x{syn.width}) in {Path(workdir) / 'data'}"
            )
            prepare_synthetic_store(
                Path(workdir) / "data",
                num_images=num_images,
                num_classes=syn.num_classes,
                height=syn.height,
                width=syn.width,
                seed=syn.seed,
                camera=Camera(syn.background, syn.saturation, syn.bits),
                difficulty=syn.difficulty,
            )
        world.barrier()
    path = source_path(config, workdir)
    if not path.exists():
        raise FileNotFoundError(
            f"no image store at {path}: import one first (mcnn-data bbbc021|folder|synthetic ... --out {path}) "
            f"or set --config.data.store"
        )
    if not mont.grid:
        return open_store(path)
    dst = montage_path(config, workdir)  # on every rank, before rank 0 creates it
    if world.is_primary:
        logging.info(f"preparing the {mont.grid} whole-well montage ({mont.order} order) of {path} in {dst}")
        try:  # never replaces a complete store: another run or reader may be using it
            montage_store(path, dst, mont.grid, mont.order, mont.skip_incomplete)
        except StoreError as e:
            if not is_complete(dst):
                raise
            raise StoreError(
                f"{dst} already holds a complete montage of other inputs than this config's data.montage and store "
                f"(another source store, grid, order or codec, or its source rebuilt since): remove it, or set "
                f"data.montage.store to another folder"
            ) from e
    world.barrier()
    return open_store(dst)
