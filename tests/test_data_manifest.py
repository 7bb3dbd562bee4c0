"""The manifest importer: a table per field, five channels, relative and absolute paths, Metadata_* kept, a
treatment table, bad rows named, resume; and a tiny five-channel training run on such a store."""

import csv

import numpy as np
import pytest
import tifffile

from mcnn_jax.data import ImportDataError, Reader, open_store
from mcnn_jax.data.manifest import import_manifest
from mcnn_jax.data.store import is_complete

CH = ("DNA", "ER", "RNA", "AGP", "Mito")
H, W = 16, 20


def write_table(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture()
def screen(tmp_path):
    """8 fields on 2 plates; channel k of field i holds 1000 * k + i + noise; odd fields use absolute paths."""
    rng = np.random.default_rng(0)
    root = tmp_path / "screen"
    header = [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Site",
        "Metadata_Compound",
        "Metadata_Concentration",
        "Metadata_Batch",
        *CH,
    ]
    rows, pixels = [], []
    for i in range(8):
        plate, well = f"P{i // 4}", f"B{i % 4 + 2:02d}"
        img = (1000 * np.arange(5)[None, None, :] + i + rng.integers(0, 50, (H, W, 5))).astype(np.uint16)
        paths = []
        for k, ch in enumerate(CH):
            rel = f"img/{plate}/{well}_s1_{ch}.tif"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / rel, img[..., k])
            paths.append(str(root / rel) if i % 2 else rel)
        rows.append(
            [
                plate,
                well,
                1,
                ["DMSO", "taxol", "nocodazole", "AZ138"][i % 4],
                ["0", "0.3", "1", "3"][i % 4],
                f"batch{i % 2}",
                *paths,
            ]
        )
        pixels.append(img)
    write_table(root / "index.csv", header, rows)
    write_table(
        root / "moa.csv",
        ["compound", "concentration", "moa"],
        [
            ["DMSO", "0.0", "DMSO"],
            ["taxol", "0.30", "Microtubule stabilizers"],
            ["nocodazole", "1.0", "Microtubule destabilizers"],
            ["AZ138", "3", "Eg5 inhibitors"],
        ],
    )
    return root, header, rows, np.stack(pixels)


def manifest(screen_root, out, **kw):
    kw.setdefault("label", "Metadata_Compound,Metadata_Concentration")
    kw.setdefault("label_table", screen_root / "moa.csv")
    kw.setdefault("scaling", "none")
    return import_manifest(
        screen_root / "index.csv",
        out,
        table_keys=["compound", "concentration"],
        table_class="moa",
        progress=False,
        **kw,
    )


def test_five_channels_relative_and_absolute_paths_metadata_kept(screen, tmp_path):
    root, _, rows, pixels = screen
    s = open_store(manifest(root, tmp_path / "store", channels=list(CH)))
    assert s.image_shape == (H, W, 5) and s.channels == list(CH) and s.num_images == 8
    np.testing.assert_array_equal(s.read(range(8)), pixels)  # channel order and every pixel kept
    assert s.class_names == ["DMSO", "Eg5 inhibitors", "Microtubule destabilizers", "Microtubule stabilizers"]
    assert [s.class_names[k] for k in s.labels[:4]] == [
        "DMSO",
        "Microtubule stabilizers",
        "Microtubule destabilizers",
        "Eg5 inhibitors",
    ]
    md = s.metadata
    assert md["Metadata_Batch"] == [f"batch{i % 2}" for i in range(8)]  # any Metadata_* column is carried
    assert md["plate"][5] == "P1" and md["well"][5] == "B03" and md["site"][5] == 1
    assert md["compound"][1] == "taxol" and md["concentration"][1] == 0.3
    assert s.compounds == ["AZ138", "DMSO", "nocodazole", "taxol"]  # leave-one-compound-out works


def test_label_column_and_default_channels(screen, tmp_path):
    root, header, rows, pixels = screen
    write_table(root / "index.csv", [*header, "Metadata_MoA"], [[*r, f"class{i % 3}"] for i, r in enumerate(rows)])
    s = open_store(import_manifest(root / "index.csv", tmp_path / "s", scaling="none", progress=False))
    assert s.channels == list(CH) and s.class_names == ["class0", "class1", "class2"]  # default label column
    assert list(s.labels) == [i % 3 for i in range(8)]


def test_loaddata_layout_filename_and_pathname(screen, tmp_path):
    root, _, rows, pixels = screen
    header = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Class"]
    for ch in CH:
        header += [f"FileName_Orig{ch}", f"PathName_Orig{ch}"]
    table = []
    for r in rows:
        files = [p if p.startswith("/") else str(root / p) for p in r[6:]]
        table.append([*r[:3], r[3], *[x for f in files for x in (f.rsplit("/", 1)[1], f.rsplit("/", 1)[0])]])
    write_table(tmp_path / "load_data.csv", header, table)
    s = open_store(import_manifest(tmp_path / "load_data.csv", tmp_path / "s", scaling="none", progress=False))
    assert s.channels == [f"Orig{c}" for c in CH]
    np.testing.assert_array_equal(s.read(range(8)), pixels)


@pytest.mark.parametrize("damage", ["duplicate", "missing", "size", "dtype", "channel", "unlabelled"])
def test_bad_rows_are_clear_errors(screen, tmp_path, damage):
    root, header, rows, _ = screen
    rows = [list(r) for r in rows]
    target = root / rows[5][6 + 2]  # row 7 of the table (header = row 1), the RNA channel (absolute path)
    expect = [str(root / "index.csv"), "row 7"]
    if damage == "duplicate":
        rows[5][:3] = rows[2][:3]
        expect = [str(root / "index.csv"), "rows 4 and 7", "the same (plate, well, site)"]
    elif damage == "missing":
        target.unlink()
        expect += ["missing image", str(target), "RNA channel"]
    elif damage == "size":
        tifffile.imwrite(target, np.zeros((H, W + 1), np.uint16))
        expect += [str(target), "16x21x1", "first row's is 16x20x1"]
    elif damage == "dtype":
        tifffile.imwrite(target, np.zeros((H, W), np.uint8))
        expect += [str(target), "uint8"]
    elif damage == "channel":
        rows[5][6 + 2] = ""
        expect += ["the RNA channel is missing"]
    elif damage == "unlabelled":
        rows[5][3] = "unknown-drug"
        expect += ["no class for Metadata_Compound='unknown-drug'", "moa.csv"]
    write_table(root / "index.csv", header, rows)
    with pytest.raises(ImportDataError) as e:
        manifest(root, tmp_path / "store")
    for text in expect:
        assert text in str(e.value), (text, str(e.value))
    assert not is_complete(tmp_path / "store")
    if damage == "unlabelled":  # ... unless such rows are to be left out
        assert open_store(manifest(root, tmp_path / "store", drop_unlabelled=True)).num_images == 7


def test_interrupted_import_resumes(screen, tmp_path, monkeypatch):
    root, _, _, pixels = screen
    import mcnn_jax.data.manifest as m

    real, calls = m.read_manifest_field, []

    def flaky(f, *a, **kw):
        calls.append(f.line)
        if len(calls) == 6:
            raise KeyboardInterrupt  # the import stops after a few images
        return real(f, *a, **kw)

    monkeypatch.setattr(m, "read_manifest_field", flaky)
    with pytest.raises(KeyboardInterrupt):
        manifest(root, tmp_path / "store", workers=1)
    assert not is_complete(tmp_path / "store")
    monkeypatch.setattr(m, "read_manifest_field", real)
    done = sum((tmp_path / "store" / "images.zarr" / "c" / str(i)).exists() for i in range(8))
    assert 0 < done < 8
    s = open_store(manifest(root, tmp_path / "store"))
    np.testing.assert_array_equal(s.read(range(8)), pixels)


def test_reader_and_scaling_per_channel(screen, tmp_path):
    root, _, _, _ = screen
    s = open_store(manifest(root, tmp_path / "store", scaling="image", dtype="uint8"))
    x = s.read(range(8))
    assert x.dtype == np.uint8 and (x.reshape(-1, 5).max(0) == 255).all()  # every channel spans the range
    r = Reader(s, np.arange(8), global_batch=4, augment=dict(flips=True, intensity_jitter=0.1))
    _, batch = next(r.iterate())
    r.close()
    assert batch["image"].shape == (4, H, W, 5) and batch["image"].dtype == np.float32


def test_tiny_five_channel_training_run(tmp_path):
    """configs/tiny.py on a five-channel synthetic Cell Painting store (mcnn-data synthetic --channels 5)."""
    from pathlib import Path

    from mcnn_jax.cli.data import main
    from mcnn_jax.config import load_config
    from mcnn_jax.train import train_and_evaluate

    store = tmp_path / "store"
    assert (
        main(
            [
                "synthetic",
                "--channels",
                "5",
                "--out",
                str(tmp_path / "raw"),
                "--images",
                "48",
                "--classes",
                "4",
                "--height",
                "128",
                "--width",
                "128",
                "--store",
                str(store),
                "--quiet",
            ]
        )
        == 0
    )
    assert (tmp_path / "raw" / "manifest.csv").is_file()
    assert len(list((tmp_path / "raw" / "images").rglob("*_Mito.tif"))) == 48
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    with pytest.raises(ValueError, match=r"holds 128x128x5 images.*input_shape='\(128, 128, 5\)'"):
        train_and_evaluate(
            load_config(tiny, [f"data.store={store}", "data.synthetic.enabled=false"]), tmp_path / "wrong"
        )
    cfg = load_config(tiny, [f"data.store={store}", "data.synthetic.enabled=false", "model.input_shape=(128,128,5)"])
    summary = train_and_evaluate(cfg, tmp_path / "run")
    assert summary["final_step"] == 2 and summary["class_names"] == [
        "DMSO",
        "coarse-dense",
        "fine-puncta",
        "middle-large_nuclei",
    ]
    import jax

    first_conv = [x for x in jax.tree_util.tree_leaves(summary["params"]["branch0"]) if x.ndim == 4][0]
    assert first_conv.shape[2] == 5  # the model takes five channels
    import json

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["split"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_center_crop(screen, tmp_path):
    root, _, _, pixels = screen
    s = open_store(manifest(root, tmp_path / "store", crop=(8, 12)))
    assert s.image_shape == (8, 12, 5)
    np.testing.assert_array_equal(s.read(range(8)), pixels[:, 4:12, 4:16])
    with pytest.raises(ImportDataError, match=r"index.csv row 2 is 16x20, smaller than the crop 32x32"):
        manifest(root, tmp_path / "s2", crop=(32, 32))
