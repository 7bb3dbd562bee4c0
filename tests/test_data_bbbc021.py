import csv
import shutil

import numpy as np
import pytest
import tifffile
from conftest import BBBC021_CSVS

from mcnn_jax.data import ImportDataError, import_bbbc021, open_store
from mcnn_jax.data.bbbc021 import CHANNELS, IMAGE_CSV, MOA_CSV, read_metadata, site_from_filename
from mcnn_jax.data.store import is_complete

pytestmark = pytest.mark.skipif(
    not (BBBC021_CSVS / IMAGE_CSV).is_file(), reason=f"the BBBC021 CSVs are not in {BBBC021_CSVS}"
)
H, W = 64, 80
OFFSET = {"DAPI": 1000, "Tubulin": 20000, "Actin": 40000}  # channel-specific levels, to check the order


def test_real_csvs_have_3848_images_13_classes_38_compounds():
    rows = read_metadata(BBBC021_CSVS)
    assert len(rows) == 3848
    classes = {r.moa for r in rows}
    assert len(classes) == 13 and "DMSO" in classes
    assert len({r.compound for r in rows} - {"DMSO"}) == 38
    assert {r.site for r in rows} <= {1, 2, 3, 4} and min(r.site for r in rows) == 1


def test_site_from_filename():
    assert site_from_filename("G10_s1_w1BEDC2073-A983-4B98-95E9-84466707A25D.tif") == 1
    assert site_from_filename("Week8_4sites_F10_s3_w1F8F4.tif") == 3


@pytest.fixture()
def subset(tmp_path):
    """The real CSVs cut to 2 images of each of 4 classes, with small generated 16-bit TIFFs."""
    with open(BBBC021_CSVS / IMAGE_CSV, newline="") as f:
        reader = csv.DictReader(f)
        header, all_rows = reader.fieldnames, list(reader)
    moa = {
        (r["compound"], float(r["concentration"])): r["moa"]
        for r in csv.DictReader(open(BBBC021_CSVS / MOA_CSV, newline=""))
    }
    want = ["DMSO", "Actin disruptors", "Eg5 inhibitors", "Microtubule stabilizers"]
    picked, per_class = [], {c: 0 for c in want}
    for r in all_rows:
        m = moa.get((r["Image_Metadata_Compound"], float(r["Image_Metadata_Concentration"])))
        if m in per_class and per_class[m] < 2:
            picked.append(r)
            per_class[m] += 1
    meta, images = tmp_path / "meta", tmp_path / "images"
    meta.mkdir()
    shutil.copy(BBBC021_CSVS / MOA_CSV, meta / MOA_CSV)
    with open(meta / IMAGE_CSV, "w", newline="") as f:
        w = csv.DictWriter(f, header)
        w.writeheader()
        w.writerows(picked)
    rng = np.random.default_rng(0)
    for r in picked:
        for ch in CHANNELS:
            p = images / r[f"Image_PathName_{ch}"] / r[f"Image_FileName_{ch}"]
            p.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(p, (OFFSET[ch] + rng.integers(0, 500, (H, W))).astype(np.uint16))
    return meta, images, picked, header


def test_import_subset(subset, tmp_path):
    meta, images, picked, _ = subset
    out = import_bbbc021(meta, images, tmp_path / "store", scaling="none", progress=False)
    s = open_store(out)
    assert s.num_images == 8 and s.image_shape == (H, W, 3) and s.dtype == np.uint16
    assert s.class_names == sorted(["DMSO", "Actin disruptors", "Eg5 inhibitors", "Microtubule stabilizers"])
    assert s.class_counts() == {c: 2 for c in s.class_names}
    x = s.read(range(8))
    for k, ch in enumerate(CHANNELS):  # stacked DAPI, tubulin, actin
        assert OFFSET[ch] <= x[..., k].min() and x[..., k].max() < OFFSET[ch] + 500
    first = picked[0]
    raw = tifffile.imread(images / first["Image_PathName_Tubulin"] / first["Image_FileName_Tubulin"])
    np.testing.assert_array_equal(x[0, ..., 1], raw)
    md = s.metadata
    assert md["compound"][0] == first["Image_Metadata_Compound"]
    assert md["plate"][0] == first["Image_Metadata_Plate_DAPI"] and md["well"][0] == first["Image_Metadata_Well_DAPI"]
    assert md["site"][0] == site_from_filename(first["Image_FileName_DAPI"])
    assert md["class"][0] == s.class_names[s.labels[0]]
    assert md["concentration"][0] == float(first["Image_Metadata_Concentration"])


def test_scaling_and_illumination(subset, tmp_path):
    meta, images, _, _ = subset
    for scaling in ("plate", "image"):
        s = open_store(
            import_bbbc021(
                meta, images, tmp_path / scaling, scaling=scaling, illumination=True, dtype="uint8", progress=False
            )
        )
        x = s.read(range(s.num_images))
        assert x.dtype == np.uint8 and x.min() == 0 and x.max() == 255
        # each channel now spans the range (percentile scaling); the channel offsets are gone
        assert abs(float(x[..., 0].mean()) - float(x[..., 2].mean())) < 40


def test_mac_cr_line_endings_are_read(subset, tmp_path):
    meta, images, picked, _ = subset
    for name in (IMAGE_CSV, MOA_CSV):
        text = (meta / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r")
        assert b"\n" not in text
        (meta / name).write_bytes(text)
    rows = read_metadata(meta)
    assert len(rows) == 8 and rows[0].compound == picked[0]["Image_Metadata_Compound"]
    assert open_store(import_bbbc021(meta, images, tmp_path / "s", progress=False)).num_images == 8


def _first_file(images, r, ch):
    return images / r[f"Image_PathName_{ch}"] / r[f"Image_FileName_{ch}"]


@pytest.mark.parametrize(
    "damage", ["missing", "corrupt", "truncated", "size", "dtype", "channel", "columns", "duplicate"]
)
def test_bad_input_is_a_clear_error_and_no_store_is_complete(subset, tmp_path, damage):
    meta, images, picked, header = subset
    r = picked[3]
    p = _first_file(images, r, "Actin")
    expect = [str(p), "row 5", "Actin"]
    if damage == "missing":
        p.unlink()
        expect.insert(0, "missing TIFF")
    elif damage == "corrupt":
        p.write_bytes(b"II*\x00garbage" + bytes(50))
        expect.insert(0, "cannot read")
    elif damage == "truncated":
        p.write_bytes(p.read_bytes()[:3000])
        expect.insert(0, "cannot read")
    elif damage == "size":
        tifffile.imwrite(p, np.zeros((H, W + 1), np.uint16))
        expect.insert(0, "64x81")
    elif damage == "dtype":
        tifffile.imwrite(p, np.zeros((H, W), np.uint8))
        expect.insert(0, "dtype uint8")
    elif damage == "channel":
        rows = [dict(x) for x in picked]
        rows[3]["Image_FileName_Tubulin"] = ""
        with open(meta / IMAGE_CSV, "w", newline="") as f:
            w = csv.DictWriter(f, header)
            w.writeheader()
            w.writerows(rows)
        expect = [str(meta / IMAGE_CSV), "row 5", "Tubulin channel is missing"]
    elif damage == "duplicate":
        rows = [dict(x) for x in picked]
        rows[3] = dict(rows[1])
        with open(meta / IMAGE_CSV, "w", newline="") as f:
            w = csv.DictWriter(f, header)
            w.writeheader()
            w.writerows(rows)
        expect = [str(meta / IMAGE_CSV), "rows 3 and 5", "the same (plate, well, site)"]
    elif damage == "columns":
        bad = [h for h in header if h != "Image_Metadata_Compound"]
        with open(meta / IMAGE_CSV, "w", newline="") as f:
            w = csv.DictWriter(f, bad, extrasaction="ignore")
            w.writeheader()
            w.writerows(picked)
        expect = [str(meta / IMAGE_CSV), "missing CSV column", "Image_Metadata_Compound"]
    with pytest.raises(ImportDataError) as e:
        import_bbbc021(meta, images, tmp_path / "store", progress=False)
    for text in expect:
        assert text in str(e.value)
    assert not is_complete(tmp_path / "store")


def test_check_folder_with_the_real_csvs(subset, tmp_path):
    from mcnn_jax.data.bbbc021 import check_folder

    empty = check_folder(BBBC021_CSVS, tmp_path / "nothing")  # nothing downloaded yet: all 55 plates missing
    assert empty.num_images == 3848 and len(empty.plates) == 55 and len(empty.missing_plates) == 55
    assert not empty.ok and "Week1/Week1_22123" in empty.summary() and not empty.missing_files
    meta, images, picked, _ = subset
    assert check_folder(meta, images).ok
    _first_file(images, picked[1], "DAPI").unlink()
    report = check_folder(meta, images)
    assert not report.ok and report.missing_files == [
        (3, "DAPI", f"{picked[1]['Image_PathName_DAPI']}/{picked[1]['Image_FileName_DAPI']}")
    ]
