"""Image files read by their axes (tifffile's names) into [H, W, C]; the folder importer uses it."""

import numpy as np
import pytest
import tifffile

from mcnn_jax.data import ImportDataError, import_folder, open_store
from mcnn_jax.data.images import read_image, to_yxc

RNG = np.random.default_rng(0)
CYX = RNG.integers(0, 60000, (5, 12, 10), dtype=np.uint16)  # 5 channels, 12 x 10 pixels
YXC = np.moveaxis(CYX, 0, -1)


def test_cyx_yxc_and_multipage_tiffs_give_the_same_hwc(tmp_path):
    tifffile.imwrite(tmp_path / "cyx.ome.tif", CYX, metadata={"axes": "CYX"})
    tifffile.imwrite(
        tmp_path / "yxc.ome.tif", YXC, metadata={"axes": "YXC"}, photometric="minisblack", planarconfig="contig"
    )
    tifffile.imwrite(tmp_path / "pages.tif", CYX)  # no axis metadata: tifffile says QYX (one page per channel)
    tifffile.imwrite(tmp_path / "one.tif", CYX[0])
    for name in ("cyx.ome.tif", "yxc.ome.tif", "pages.tif"):
        a = read_image(tmp_path / name)
        assert a.shape == (12, 10, 5), name
        np.testing.assert_array_equal(a, YXC)
    np.testing.assert_array_equal(read_image(tmp_path / "one.tif"), YXC[..., :1])


def test_zcyx_stack_with_a_chosen_plane(tmp_path):
    stack = RNG.integers(0, 60000, (3, 5, 12, 10), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "z.ome.tif", stack, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "z.ome.tif", {"Z": 2}), np.moveaxis(stack[2], 0, -1))
    with pytest.raises(ImportDataError, match=r"z.ome.tif: axes ZCYX have 3 Z planes; choose one"):
        read_image(tmp_path / "z.ome.tif")
    with pytest.raises(ImportDataError, match=r"plane Z=3 is outside the 3 planes"):
        read_image(tmp_path / "z.ome.tif", {"Z": 3})


def test_unresolvable_axes_name_the_file_and_axes(tmp_path):
    tifffile.imwrite(
        tmp_path / "two.tif",
        RNG.integers(0, 9, (2, 3, 12, 10), dtype=np.uint16),
        photometric="rgb",
        planarconfig="separate",
    )  # two pages of 3 samples: QSYX
    with pytest.raises(ImportDataError) as e:
        read_image(tmp_path / "two.tif")
    assert str(tmp_path / "two.tif") in str(e.value) and "cannot resolve axes QSYX" in str(e.value)
    with pytest.raises(ImportDataError, match="no Y and X axes"):
        to_yxc(np.zeros((3, 4)), "CX", "x.tif")
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((4, 4), np.float32))
    with pytest.raises(ImportDataError, match=r"f.tif: dtype float32"):
        read_image(tmp_path / "f.tif")


def test_folder_import_of_channel_first_tiffs(tmp_path):
    """The bug of issue 15: a CYX TIFF was taken for rows; now the folder importer reads it by its axes."""
    for k, cls in enumerate(("a", "b")):
        (tmp_path / "in" / cls).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "in" / cls / "x.ome.tif", CYX + k, metadata={"axes": "CYX"})
    s = open_store(import_folder(tmp_path / "in", tmp_path / "store", progress=False))
    assert s.image_shape == (12, 10, 5) and len(s.channels) == 5
    np.testing.assert_array_equal(s.read([1])[0], YXC + 1)
