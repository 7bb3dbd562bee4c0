import pytest

from mcnn_jax.data.cli import main


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("bbbc021", "folder", "synthetic", "info"):
        assert cmd in out


def test_synthetic_import_and_info(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path / "raw"), "--images", "12", "--classes", "3", "--height",
                 "64", "--width", "64", "--quiet"]) == 0
    assert main(["bbbc021", "--metadata", str(tmp_path / "raw"), "--images", str(tmp_path / "raw"), "--out",
                 str(tmp_path / "store"), "--quiet", "--dtype", "uint8", "--codec", "zstd1"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "12 of 64x64x3 uint8" in out and "DMSO" in out and "coarse-dense" in out and "cmpd01a" in out
    # a second import without --overwrite is refused; info on a missing store is an error
    assert main(["bbbc021", "--metadata", str(tmp_path / "raw"), "--images", str(tmp_path / "raw"), "--out",
                 str(tmp_path / "store"), "--quiet"]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope")]) == 1
