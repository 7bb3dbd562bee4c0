import numpy as np
import pytest
import tifffile
from PIL import Image

from mcnn_jax.data import ImportDataError, import_folder, open_store
from mcnn_jax.data.store import is_complete


def make_folder(root, rng):
    imgs = {}
    for cls, n in (("cats", 3), ("dogs", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
            if i % 2:
                Image.fromarray(a).save(root / cls / f"{i}.png")
            else:
                tifffile.imwrite(root / cls / f"{i}.tif", a, photometric="rgb")
            imgs[f"{cls}/{i}"] = a
    return imgs


def test_folder_import(tmp_path):
    imgs = make_folder(tmp_path / "in", np.random.default_rng(0))
    s = open_store(import_folder(tmp_path / "in", tmp_path / "store", progress=False))
    assert s.class_names == ["cats", "dogs"] and list(s.labels) == [0, 0, 0, 1, 1]
    assert s.image_shape == (12, 10, 3) and s.dtype == np.uint8
    x = s.read(range(5))
    for k, f in enumerate(s.metadata["file"]):
        np.testing.assert_array_equal(x[k], imgs[f.rsplit(".", 1)[0]])
    assert s.compounds == []


def test_empty_class_folder(tmp_path):
    make_folder(tmp_path / "in", np.random.default_rng(0))
    (tmp_path / "in" / "birds").mkdir()
    with pytest.raises(ImportDataError, match=r"class folder .*birds is empty"):
        import_folder(tmp_path / "in", tmp_path / "store", progress=False)
    assert not is_complete(tmp_path / "store")


def test_mismatched_and_corrupt_images(tmp_path):
    make_folder(tmp_path / "in", np.random.default_rng(0))
    Image.fromarray(np.zeros((12, 11, 3), np.uint8)).save(tmp_path / "in" / "dogs" / "z.png")
    with pytest.raises(ImportDataError, match=r"dogs/z.png is \(12, 11, 3\)"):
        import_folder(tmp_path / "in", tmp_path / "store", progress=False)
    (tmp_path / "in" / "dogs" / "z.png").write_bytes(b"not a png")
    with pytest.raises(ImportDataError, match=r"cannot read image .*dogs/z.png"):
        import_folder(tmp_path / "in", tmp_path / "store", progress=False)
    assert not is_complete(tmp_path / "store")
