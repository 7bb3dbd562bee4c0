import pytest

from mcnn_jax.cli.data import main


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("bbbc021", "folder", "synthetic", "info"):
        assert cmd in out


def test_synthetic_import_and_info(tmp_path, capsys):
    assert (
        main(
            [
                "synthetic",
                "--out",
                str(tmp_path / "raw"),
                "--images",
                "12",
                "--classes",
                "3",
                "--height",
                "64",
                "--width",
                "64",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "bbbc021",
                "--metadata",
                str(tmp_path / "raw"),
                "--images",
                str(tmp_path / "raw"),
                "--out",
                str(tmp_path / "store"),
                "--quiet",
                "--dtype",
                "uint8",
                "--codec",
                "zstd1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["info", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "12 of 64x64x3 uint8" in out and "DMSO" in out and "coarse-dense" in out and "cmpd01a" in out
    # a second import without --overwrite is refused; info on a missing store is an error
    assert (
        main(
            [
                "bbbc021",
                "--metadata",
                str(tmp_path / "raw"),
                "--images",
                str(tmp_path / "raw"),
                "--out",
                str(tmp_path / "store"),
                "--quiet",
            ]
        )
        == 1
    )
    assert "overwrite" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope")]) == 1


def test_info_tells_no_store_from_an_interrupted_import(tmp_path, capsys):
    import numpy as np

    from mcnn_jax.data.store import StoreWriter

    raw = tmp_path / "raw"  # a folder that is not a store (here: a screen's TIFFs and CSVs)
    assert (
        main(
            [
                "synthetic",
                "--out",
                str(raw),
                "--images",
                "4",
                "--classes",
                "2",
                "--height",
                "32",
                "--width",
                "32",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["info", str(raw)]) == 1
    err = capsys.readouterr().err
    assert "is not an image store" in err and "incomplete" not in err and "rerun" not in err
    w = StoreWriter(tmp_path / "half", 2, (4, 4, 1), "uint8")  # an import that stopped after one image
    w.write(0, np.ones((4, 4, 1), np.uint8))
    w.flush()
    assert main(["info", str(tmp_path / "half")]) == 1
    err = capsys.readouterr().err
    assert "incomplete" in err and "rerun the import" in err and "not an image store" not in err


def test_bbbc021_check_lists_missing_plates_and_files(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert (
        main(
            [
                "synthetic",
                "--out",
                str(raw),
                "--images",
                "250",
                "--classes",
                "2",
                "--height",
                "16",
                "--width",
                "16",
                "--quiet",
            ]
        )
        == 0
    )  # 250 images: 2 plates of 60 wells x 4 sites
    capsys.readouterr()
    args = ["bbbc021", "--metadata", str(raw), "--images", str(raw), "--check"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "250 images" in out and "ready to import" in out
    import shutil

    plates = sorted(p for p in raw.glob("Week*/Week*") if p.is_dir())
    assert len(plates) >= 2
    shutil.rmtree(plates[-1])  # one plate not unpacked ...
    victim = next(plates[0].glob("*_w2*.tif"))
    victim.unlink()  # ... and one file missing in another
    assert main(args) == 1
    out = capsys.readouterr().out
    rel = plates[-1].relative_to(raw).as_posix()
    assert "missing plate folders (1; " in out and rel in out
    assert "missing files in present plate folders: 1" in out and str(victim) in out and "(Tubulin)" in out
    assert "not ready" in out
    assert main(["bbbc021", "--metadata", str(raw), "--images", str(raw)]) == 1  # no --out, no --check
    assert "--out STORE is required" in capsys.readouterr().err


def test_manifest_and_ome_zarr_commands(tmp_path, capsys):
    import json

    import numpy as np
    import tensorstore as ts

    from mcnn_jax.data import open_store
    from mcnn_jax.data.omezarr import write_plate

    raw = tmp_path / "cp"
    assert (
        main(
            [
                "synthetic",
                "--channels",
                "5",
                "--out",
                str(raw),
                "--images",
                "8",
                "--classes",
                "2",
                "--height",
                "40",
                "--width",
                "48",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "manifest",
                "--index",
                str(raw / "manifest.csv"),
                "--out",
                str(tmp_path / "m"),
                "--label",
                "Metadata_MoA",
                "--channels",
                "Mito,DNA",
                "--crop",
                "32",
                "32",
                "--scaling",
                "none",
                "--quiet",
            ]
        )
        == 0
    )
    assert "8 of 32x32x2 uint16 (channels: Mito, DNA)" in capsys.readouterr().out
    stack = np.arange(3 * 2 * 16 * 16, dtype=np.uint16).reshape(3, 2, 16, 16)  # ZCYX
    plate = write_plate(tmp_path / "p.zarr", {"B/2": [np.zeros((2, 16, 16), np.uint16)]}, "0.5")
    zj = plate / "B/2/0/zarr.json"  # make the field a Z stack: axes z, c, y, x
    meta = json.loads(zj.read_text())
    meta["attributes"]["ome"]["multiscales"][0]["axes"].insert(0, {"name": "z", "type": "space"})
    zj.write_text(json.dumps(meta))
    ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(plate / "B/2/0/0")},
            "metadata": {"shape": [3, 2, 16, 16], "data_type": "uint16"},
        },
        create=True,
        delete_existing=True,
    ).result().write(stack).result()
    args = ["ome-zarr", "--plate", str(plate), "--out", str(tmp_path / "z"), "--scaling", "none", "--quiet"]
    assert main(args) == 1 and "3 Z planes; choose one" in capsys.readouterr().err
    assert main([*args, "--plane", "Z=2"]) == 0
    x = open_store(tmp_path / "z").read([0])[0]
    np.testing.assert_array_equal(x, np.moveaxis(stack[2], 0, -1))
