import types

import numpy as np
import pytest

from mcnn_jax.config import base_config
from mcnn_jax.data import open_store, split_indices


def fake_store(labels, compounds=None):
    n = len(labels)
    return types.SimpleNamespace(
        labels=np.asarray(labels, np.int32), path="fake", metadata={"compound": compounds or [""] * n}, num_images=n
    )


def test_random_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), [50, 20, 10, 5])
    cfg = base_config().data
    tr, va = split_indices(fake_store(labels), cfg)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
    assert [int((labels[va] == c).sum()) for c in range(4)] == [10, 4, 2, 1]
    tr2, va2 = split_indices(fake_store(labels), cfg)
    np.testing.assert_array_equal(va, va2)
    cfg.split_seed = 1
    assert not np.array_equal(va, split_indices(fake_store(labels), cfg)[1])


def test_compound_split(data_synthetic_store):
    s = open_store(data_synthetic_store)
    cfg = base_config().data
    cfg.split = "compound"
    cfg.holdout_compound = "cmpd02b"
    tr, va = split_indices(s, cfg)
    comp = np.array(s.metadata["compound"])
    assert len(va) > 0 and set(comp[va]) == {"cmpd02b"} and "cmpd02b" not in set(comp[tr])
    cfg.holdout_compound = "aspirin"
    with pytest.raises(ValueError, match=r"'aspirin' is not a compound.*DMSO, cmpd01a"):
        split_indices(s, cfg)


def test_never_an_empty_set():
    cfg = base_config().data
    with pytest.raises(ValueError, match="empty validation"):
        split_indices(fake_store([0, 1, 2]), cfg)  # one image per class: nothing can go to validation
    cfg.split = "compound"
    cfg.holdout_compound = "x"
    with pytest.raises(ValueError, match="empty training"):
        split_indices(fake_store([0, 1], ["x", "x"]), cfg)
    with pytest.raises(ValueError, match="records none"):
        split_indices(fake_store([0, 1]), cfg)
    cfg.split = "bogus"
    with pytest.raises(ValueError, match="'random' or 'compound'"):
        split_indices(fake_store([0, 1]), cfg)
