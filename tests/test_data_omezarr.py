"""OME-Zarr HCS plates (NGFF 0.4 / zarr v2 and 0.5 / zarr v3), written by the test, imported into stores."""

import csv
import json

import numpy as np
import pytest

from mcnn_jax.data import ImportDataError, open_store
from mcnn_jax.data.omezarr import import_ome_zarr, read_plate, well_name, write_plate
from mcnn_jax.data.store import is_complete

RNG = np.random.default_rng(1)
CH = ["DNA", "ER", "RNA", "AGP", "Mito"]
WELLS = {
    "B/3": [RNG.integers(0, 60000, (5, 24, 32), dtype=np.uint16) for _ in range(2)],
    "C/10": [RNG.integers(0, 60000, (5, 24, 32), dtype=np.uint16)],
}


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_plate_roundtrip_both_versions(tmp_path, version):
    plate = write_plate(tmp_path / "plate.zarr", WELLS, version, CH, name="Plate-7")
    meta = plate / ("zarr.json" if version == "0.5" else ".zattrs")
    attrs = json.loads(meta.read_text())
    if version == "0.5":  # zarr v3 groups, OME metadata under attributes.ome
        assert attrs["zarr_format"] == 3 and attrs["attributes"]["ome"]["version"] == "0.5"
        assert json.loads((plate / "B/3/0/0/zarr.json").read_text())["zarr_format"] == 3
    else:
        assert attrs["plate"]["version"] == "0.4" and (plate / "B/3/0/0/.zarray").is_file()
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Metadata_Well", "Metadata_MoA"], ["B03", "DMSO"], ["C10", "taxol"]])
    s = open_store(
        import_ome_zarr(plate, tmp_path / "store", labels=tmp_path / "labels.csv", scaling="none", progress=False)
    )
    assert s.image_shape == (24, 32, 5) and s.channels == CH and s.info["ngff_version"] == version
    x = s.read(range(3))
    for k, img in enumerate([*WELLS["B/3"], *WELLS["C/10"]]):
        np.testing.assert_array_equal(x[k], np.moveaxis(img, 0, -1))
    md = s.metadata
    assert md["well"] == ["B03", "B03", "C10"] and md["well_path"] == ["B/3", "B/3", "C/10"]
    assert md["field"] == ["0", "1", "0"] and md["site"] == [1, 2, 1] and md["plate"] == ["Plate-7"] * 3
    assert [s.class_names[k] for k in s.labels] == ["DMSO", "DMSO", "taxol"]


def test_without_labels_and_bad_inputs(tmp_path):
    plate = write_plate(tmp_path / "p.zarr", WELLS, "0.5", CH)
    s = open_store(import_ome_zarr(plate, tmp_path / "s", crop=(16, 16), scaling="none", progress=False))
    assert s.class_names == ["unlabelled"] and s.num_images == 3 and s.image_shape == (16, 16, 5)
    np.testing.assert_array_equal(s.read([2])[0], np.moveaxis(WELLS["C/10"][0], 0, -1)[4:20, 8:24])
    with pytest.raises(ImportDataError, match=r"level 1 does not exist \(the image has 1 levels\)"):
        read_plate(plate, level=1)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Metadata_Well", "class"], ["B3", "a"]])
    with pytest.raises(ImportDataError, match=r"no class for well\(s\) \['C10'\]"):
        import_ome_zarr(plate, tmp_path / "t", labels=tmp_path / "labels.csv", progress=False)
    assert (
        open_store(
            import_ome_zarr(plate, tmp_path / "t", labels=tmp_path / "labels.csv", drop_unlabelled=True, progress=False)
        ).num_images
        == 2
    )
    meta = json.loads((plate / "zarr.json").read_text())
    meta["attributes"]["ome"]["plate"]["wells"].append(meta["attributes"]["ome"]["plate"]["wells"][0])
    (tmp_path / "dup.zarr").mkdir()
    (tmp_path / "dup.zarr" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ImportDataError, match=r"dup.zarr: the plate lists well\(s\) \['B/3'\] more than once"):
        read_plate(tmp_path / "dup.zarr")
    with pytest.raises(ImportDataError, match="not an HCS plate"):
        import_ome_zarr(plate / "B/3", tmp_path / "u", progress=False)
    (plate / "C/10/0/0/c/0/0/0").write_bytes(b"broken")  # a damaged chunk: the error names the array
    with pytest.raises(ImportDataError, match=r"cannot read the zarr array .*C/10/0/0 \(well C10\)"):
        import_ome_zarr(plate, tmp_path / "v", progress=False)
    assert not is_complete(tmp_path / "v")


def test_well_names():
    assert well_name("B/3") == well_name("B3") == well_name("b03") == "B03"
    assert well_name("AA/12") == "AA12" and well_name("odd-name") == "odd-name"
