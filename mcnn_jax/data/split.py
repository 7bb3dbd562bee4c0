"""Train / validation splits of a store, from a config's ``data`` section.

- ``split = "random"``: stratified by class and seeded by ``split_seed``: each class contributes
  round(val_fraction x its size) images to validation (at least one if it has two or more images, never all).
- ``split = "compound"``: leave-one-compound-out: the images of ``holdout_compound`` are the validation set,
  all others train.

Both return sorted int64 index arrays and never an empty train or validation set (ValueError instead).
"""

from __future__ import annotations

import numpy as np


def split_indices(store, data_config) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train_indices, val_indices) for ``store`` as chosen by ``data_config`` (see module docstring)."""
    kind = data_config.split
    labels = np.asarray(store.labels)
    n = len(labels)
    if kind == "random":
        frac = float(data_config.val_fraction)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {frac}")
        rng = np.random.default_rng([int(data_config.split_seed), 104729])
        val = []
        for c in range(int(labels.max()) + 1 if n else 0):
            members = np.flatnonzero(labels == c)
            if len(members) < 2:
                continue
            k = min(len(members) - 1, max(1, int(round(frac * len(members)))))
            val.append(rng.permutation(members)[:k])
        val = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    elif kind == "compound":
        name = data_config.holdout_compound
        compounds = np.asarray(store.metadata.get("compound", [""] * n), dtype=object)
        known = sorted({c for c in compounds if c})
        if not known:
            raise ValueError(
                f"data.split='compound' needs compounds, but the store {store.path} records none "
                f"(a folder import has no compounds; use split='random')"
            )
        if name not in known:
            raise ValueError(
                f"data.holdout_compound={name!r} is not a compound of the store {store.path}; "
                f"choose one of: {', '.join(known)}"
            )
        val = np.flatnonzero(compounds == name)
    else:
        raise ValueError(f"data.split must be 'random' or 'compound', got {kind!r}")
    train = np.setdiff1d(np.arange(n), val)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"the {kind!r} split of {store.path} ({n} images) leaves an empty "
            f"{'training' if len(train) == 0 else 'validation'} set"
        )
    return train.astype(np.int64), val.astype(np.int64)
