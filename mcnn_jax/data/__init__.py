"""The data layer: image stores (zarr v3 via TensorStore), importers, splits and the batch reader.

    from mcnn_jax.data import open_store, split_indices, Reader, prepare_synthetic_store

    store = open_store("data/store")            # Store: .read(indices), .labels, .class_names, .metadata
    train_idx, val_idx = split_indices(store, config.data)
    reader = Reader(store, train_idx, global_batch=32, rank=0, num_ranks=1, seed=0, augment=config.data.augment)
    for step, batch in reader.iterate(start_step=0):   # batch: image float32 [b,H,W,C] in [0,1], label, mask
        ...

Importers: ``import_bbbc021``, ``import_manifest`` (any screen from a table, any number of channels),
``import_ome_zarr`` (NGFF HCS plates), ``import_folder``; synthetic screens: ``generate_screen`` (BBBC021
layout) + ``prepare_synthetic_store``, ``generate_cellpainting_screen`` (five channels); whole-well montages of a
store: ``montage_store``. The CLI is ``mcnn-data`` (mcnn_jax.cli.data).
"""

from mcnn_jax.data.augment import Augment
from mcnn_jax.data.bbbc021 import CHANNELS as BBBC021_CHANNELS
from mcnn_jax.data.bbbc021 import import_bbbc021
from mcnn_jax.data.cellpainting import generate_cellpainting_screen
from mcnn_jax.data.folder import import_folder
from mcnn_jax.data.manifest import import_manifest
from mcnn_jax.data.montage import montage_store
from mcnn_jax.data.omezarr import import_ome_zarr
from mcnn_jax.data.reader import Reader
from mcnn_jax.data.split import split_indices
from mcnn_jax.data.store import (
    CODECS,
    DEFAULT_CODEC,
    ImportDataError,
    IncompleteStoreError,
    Store,
    StoreError,
    float_scale,
    open_store,
    to_float,
)
from mcnn_jax.data.synthetic import generate_screen, prepare_synthetic_store

__all__ = [
    "Augment",
    "BBBC021_CHANNELS",
    "CODECS",
    "DEFAULT_CODEC",
    "ImportDataError",
    "IncompleteStoreError",
    "Reader",
    "Store",
    "StoreError",
    "float_scale",
    "generate_cellpainting_screen",
    "generate_screen",
    "import_bbbc021",
    "import_folder",
    "import_manifest",
    "import_ome_zarr",
    "montage_store",
    "open_store",
    "prepare_synthetic_store",
    "split_indices",
    "to_float",
]
