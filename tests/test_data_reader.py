import itertools

import numpy as np
import pytest

from mcnn_jax.config import base_config
from mcnn_jax.data import Reader, open_store, to_float


@pytest.fixture(scope="module")
def store(data_synthetic_store):
    return open_store(data_synthetic_store)


def take(reader, n, start=0):
    return [b for _, b in itertools.islice(reader.iterate(start_step=start), n)]


AUG = dict(flips=True, rot180=True, rot90=True, intensity_jitter=0.05)


@pytest.mark.parametrize("ranks", [2, 4])
def test_global_batch_is_the_same_for_any_number_of_ranks(store, ranks):
    idx = np.arange(3, 40)
    one = Reader(store, idx, 8, seed=4, augment=AUG)
    ref = take(one, 7)  # crosses an epoch boundary (37 // 8 = 4 steps per epoch)
    one.close()
    parts = []
    for r in range(ranks):
        with Reader(store, idx, 8, rank=r, num_ranks=ranks, seed=4, augment=AUG) as rd:
            parts.append(take(rd, 7))
    for s in range(7):
        for key in ("image", "label", "mask"):
            joined = np.concatenate([parts[r][s][key] for r in range(ranks)])
            np.testing.assert_array_equal(joined, ref[s][key])  # bit-identical
        assert parts[0][s]["image"].shape == (8 // ranks, 128, 128, 3)


def test_epochs_are_shuffled_partitions_and_resume_is_identical(store):
    idx = np.arange(48)
    rd = Reader(store, idx, 12, seed=1, augment=AUG)
    assert rd.steps_per_epoch == 4
    e0 = np.concatenate([rd.batch_indices(s)[0] for s in range(4)])
    e1 = np.concatenate([rd.batch_indices(s)[0] for s in range(4, 8)])
    assert sorted(e0) == list(range(48)) and sorted(e1) == list(range(48)) and not np.array_equal(e0, e1)
    assert not np.array_equal(e0, np.arange(48))
    full = take(rd, 6)
    resumed = take(rd, 2, start=4)
    np.testing.assert_array_equal(full[4]["image"], resumed[0]["image"])
    np.testing.assert_array_equal(full[5]["label"], resumed[1]["label"])
    np.testing.assert_array_equal(full[0]["label"], store.labels[rd.batch_indices(0)[0]])
    rd.close()
    other = Reader(store, idx, 12, seed=2)
    assert not np.array_equal(other.batch_indices(0)[0], rd.batch_indices(0)[0])
    other.close()


def test_augmentation_keeps_the_full_field(store):
    idx = np.arange(48)
    plain = Reader(store, idx, 16, seed=0, augment=None)
    aug = Reader(store, idx, 16, seed=0, augment=dict(flips=True, rot180=True, rot90=True, intensity_jitter=0))
    a, b = take(plain, 1)[0]["image"], take(aug, 1)[0]["image"]
    originals = to_float(store.read(plain.batch_indices(0)[0]))
    np.testing.assert_array_equal(a, originals)
    assert a.min() >= 0 and a.max() <= 1 and a.dtype == np.float32
    changed = 0
    for x, y in zip(originals, b):
        views = [np.rot90(v, k) for v in (x, x[::-1]) for k in range(4)]  # the 8 symmetries of a square
        assert any(np.array_equal(y, v) for v in views)
        changed += not np.array_equal(x, y)
    assert changed >= 8  # most images of 16 are transformed
    jit = Reader(store, idx, 16, seed=0, augment=dict(flips=False, intensity_jitter=0.05))
    c = take(jit, 1)[0]["image"]
    ratio = c.sum(axis=(1, 2), dtype=np.float64) / a.sum(axis=(1, 2), dtype=np.float64)  # the gains
    assert np.all(np.abs(ratio - 1) <= 0.0501) and np.abs(ratio - 1).max() > 0.01
    np.testing.assert_allclose(c, a * ratio[:, None, None, :], rtol=1e-5, atol=1e-7)
    for r in (plain, aug, jit):
        r.close()


def test_rot90_only_for_square_images(data_tiny_store):
    path, images = data_tiny_store  # 8x6 images
    s = open_store(path)
    with Reader(s, range(10), 10, augment=dict(rot90=True)) as rd:
        assert take(rd, 1)[0]["image"].shape == (10, 8, 6, 2)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_eval_pass_pads_and_every_rank_gets_the_same_number_of_batches(data_tiny_store, ranks):
    path, images = data_tiny_store
    s = open_store(path)
    idx = np.array([9, 1, 4, 0, 7, 2, 3])
    seen, masks, counts = [], [], []
    for r in range(ranks):
        rd = Reader(s, idx, 3 * ranks, rank=r, num_ranks=ranks, train=False, augment=AUG)
        out = list(rd.iterate())
        counts.append(len(out))
        assert rd.steps_per_epoch == -(-7 // (3 * ranks)) == len(out)
        for step, b in out:
            valid = b["mask"] > 0
            assert b["image"].shape == (3, 8, 6, 2)
            np.testing.assert_array_equal(b["image"][valid], to_float(images[rd.batch_indices(step)[0][valid]]))
            assert np.all(b["image"][~valid] == 0)
            seen += list(rd.batch_indices(step)[0][valid])
            masks.append(b["mask"])
        rd.close()
    assert len(set(counts)) == 1
    assert sorted(seen) == sorted(idx) and sum(m.sum() for m in masks) == 7


def test_argument_errors(data_tiny_store):
    s = open_store(data_tiny_store[0])
    with pytest.raises(ValueError, match=r"global batch \(10\) must be divisible by the number of ranks \(3\)"):
        Reader(s, range(10), 10, rank=0, num_ranks=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Reader(s, range(5), 8)
    with pytest.raises(ValueError, match="rank 2"):
        Reader(s, range(10), 4, rank=2, num_ranks=2)
    with pytest.raises(ValueError, match="indices"):
        Reader(s, [0, 10], 1)


def test_config_augment_section_and_prefetch_zero(store):
    cfg = base_config()
    with Reader(store, range(48), 4, augment=cfg.data.augment, prefetch=0) as rd:
        steps = [s for s, _ in itertools.islice(rd.iterate(start_step=3), 3)]
    assert steps == [3, 4, 5]


def test_augment_from_a_config_section_or_a_partial_dict():
    from mcnn_jax.config import base_config
    from mcnn_jax.data import Augment

    assert Augment.from_config(base_config().data.augment) == Augment(True, True, False, 0.05)
    assert Augment.from_config(dict(rot90=True)) == Augment(rot90=True) and Augment.from_config(None) == Augment()
    with pytest.raises(ValueError, match="unknown augmentation key.*flip\\b.*the keys are flips"):
        Augment.from_config(dict(flip=True))
