import json

import numpy as np
import pytest

from mcnn_jax.data import IncompleteStoreError, StoreError, open_store, to_float
from mcnn_jax.data.store import CODECS, MARKER, StoreWriter, is_complete


def test_roundtrip_and_api(data_tiny_store):
    path, images = data_tiny_store
    s = open_store(path)
    assert s.path == path and s.num_images == 10 and s.image_shape == (8, 6, 2) and s.dtype == np.uint16
    assert s.labels.dtype == np.int32 and list(s.labels) == [i % 3 for i in range(10)]
    assert s.class_names == ["a", "b", "c"] and s.metadata["compound"][7] == "c2"
    np.testing.assert_array_equal(s.read([3, 0, 9]), images[[3, 0, 9]])
    assert s.read([]).shape == (0, 8, 6, 2)
    with pytest.raises(IndexError):
        s.read([10])
    assert s.class_counts() == {"a": 4, "b": 3, "c": 3}
    assert json.loads((path / MARKER).read_text())["num_images"] == 10


def test_to_float_maps_dtype_range_to_unit_interval():
    x = np.array([0, 255], np.uint8)
    np.testing.assert_array_equal(to_float(x), [0.0, 1.0])
    y = np.array([0, 32768, 65535], np.uint16)
    assert to_float(y).dtype == np.float32 and to_float(y)[2] == 1.0


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_every_codec_roundtrips(tmp_path, codec):
    img = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3) * 97
    w = StoreWriter(tmp_path / "s", 2, (4, 5, 3), "uint16", codec)
    w.write(0, img)
    w.write(1, np.zeros_like(img))  # an all-zero image is still written (a chunk equal to the fill value)
    w.finish([0, 1], ["x", "y"], {}, ["a", "b", "c"])
    np.testing.assert_array_equal(open_store(tmp_path / "s").read([0, 1]), np.stack([img, 0 * img]))


def test_missing_and_incomplete_stores_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nowhere")
    w = StoreWriter(tmp_path / "s", 3, (4, 4, 1), "uint8")
    w.write(0, np.ones((4, 4, 1), np.uint8))
    w.flush()
    with pytest.raises(IncompleteStoreError, match=r"incomplete.*rerun the import") as e:
        open_store(tmp_path / "s")
    assert str(tmp_path / "s") in str(e.value)
    # finishing with images missing refuses to mark the store complete
    with pytest.raises(StoreError, match="not written"):
        w.finish([0, 0, 0], ["a"], {}, ["c"])
    assert not is_complete(tmp_path / "s")


def test_interrupted_import_resumes_and_other_imports_restart(tmp_path):
    fp = dict(kind="test", source="A")
    w = StoreWriter(tmp_path / "s", 3, (4, 4, 1), "uint8", fingerprint=fp)
    w.write(0, np.full((4, 4, 1), 7, np.uint8))
    w.flush()
    del w  # "interrupted"
    w = StoreWriter(tmp_path / "s", 3, (4, 4, 1), "uint8", fingerprint=fp)
    assert w.resumed and w.done(0) and not w.done(1)
    w2 = StoreWriter(tmp_path / "s", 3, (4, 4, 1), "uint8", fingerprint=dict(fp, source="B"))
    assert not w2.resumed and not w2.done(0)


def test_complete_store_needs_overwrite(data_tiny_store):
    path, _ = data_tiny_store
    with pytest.raises(StoreError, match="overwrite"):
        StoreWriter(path, 2, (8, 6, 2), "uint16")
    w = StoreWriter(path, 2, (8, 6, 2), "uint16", overwrite=True)
    assert not is_complete(path)  # the marker goes first
    with pytest.raises(IncompleteStoreError):
        open_store(path)
    del w


def test_refuses_foreign_directory_and_bad_dtype(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not an image store"):
        StoreWriter(tmp_path / "d", 1, (2, 2, 1), "uint8")
    assert (tmp_path / "d" / "thesis.tex").read_text() == "precious"
    with pytest.raises(StoreError, match="uint8 or uint16"):
        StoreWriter(tmp_path / "e", 1, (2, 2, 1), "float32")


def test_damaged_store_is_a_store_error(data_tiny_store):
    path, _ = data_tiny_store
    (path / "labels.npy").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="damaged"):
        open_store(path)
