"""Whole-well montages (mcnn_jax.data.montage): stitched positions, per-well labels and metadata, errors that name
the well or column, resumable writes, the CLI, ``data.montage`` in prepare_store, and configs/montage.py."""

import logging
from pathlib import Path

import numpy as np
import pytest

from mcnn_jax.cli.data import main
from mcnn_jax.config import load_config
from mcnn_jax.data import montage
from mcnn_jax.data.montage import grid_cells, montage_store, parse_grid
from mcnn_jax.data.store import MARKER, ImportDataError, IncompleteStoreError, StoreError, StoreWriter, open_store

REPO = Path(__file__).resolve().parents[1]
H, W, C = 8, 6, 2  # a site: not square, so a transposed placement shows


def make_store(path, sites, extra=None):
    """A complete store of one random 8x6x2 uint16 image per (plate, well, site, label) of ``sites``; metadata:
    class, compound (one per well), plate, well, site, image_number, plus ``extra`` columns. Returns the images."""
    rng = np.random.default_rng(len(sites))
    images = rng.integers(0, 65535, (len(sites), H, W, C), dtype=np.uint16)
    w = StoreWriter(path, len(sites), (H, W, C), "uint16")
    for i, im in enumerate(images):
        w.write(i, im)
    meta = {
        "class": ["ab"[s[3]] for s in sites],
        "compound": [f"cmpd-{s[0]}-{s[1]}" for s in sites],
        "plate": [s[0] for s in sites],
        "well": [s[1] for s in sites],
        "site": [s[2] for s in sites],
        "image_number": list(range(len(sites))),
        **(extra or {}),
    }
    w.finish([s[3] for s in sites], ["a", "b"], {k: v for k, v in meta.items() if v is not None}, ["x", "y"])
    return images


# two wells of a 2x3 grid, their sites stored out of order (site 3 first); well B02 is class b
SITES = [("P1", "A01", s, 0) for s in (3, 1, 2, 6, 5, 4)] + [("P1", "B02", s, 1) for s in (1, 2, 3, 4, 5, 6)]


def tile(montage_image, r, c):
    return montage_image[r * H : (r + 1) * H, c * W : (c + 1) * W]


def test_grid_parsing_and_cells():
    assert parse_grid("2x3") == (2, 3) and parse_grid(" 3X1 ") == (3, 1) and parse_grid((4, 4)) == (4, 4)
    for bad in ("2", "2x", "0x2", "2x-1", "axb", "2x2x2", (0, 1), (1, 2, 3), ""):
        with pytest.raises(ValueError, match="ROWSxCOLS"):
            parse_grid(bad)
    assert grid_cells((2, 3), "row") == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert grid_cells((2, 3), "snake") == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]
    assert grid_cells((3, 2), "snake") == [(0, 0), (0, 1), (1, 1), (1, 0), (2, 0), (2, 1)]
    with pytest.raises(ValueError, match="order"):
        grid_cells((2, 2), "column")


@pytest.mark.parametrize(
    "order, where",
    [
        # site -> (row, column), by hand
        ("row", {1: (0, 0), 2: (0, 1), 3: (0, 2), 4: (1, 0), 5: (1, 1), 6: (1, 2)}),
        ("snake", {1: (0, 0), 2: (0, 1), 3: (0, 2), 4: (1, 2), 5: (1, 1), 6: (1, 0)}),
    ],
)
def test_sites_placed_by_order(tmp_path, order, where):
    images = make_store(tmp_path / "src", SITES)
    out = montage_store(tmp_path / "src", tmp_path / "dst", "2x3", order, progress=False)
    s = open_store(out)
    assert s.num_images == 2 and s.image_shape == (2 * H, 3 * W, C) and s.dtype == np.uint16
    stitched = s.read([0, 1])
    for k, (plate, well, site, _) in enumerate(SITES):
        np.testing.assert_array_equal(tile(stitched[k // 6], *where[site]), images[k], err_msg=f"{well} site {site}")


def test_labels_and_metadata_per_well(tmp_path):
    make_store(tmp_path / "src", SITES, extra={"replicate": [1] * 12})
    s = open_store(montage_store(tmp_path / "src", tmp_path / "dst", (2, 3), progress=False))
    assert list(s.labels) == [0, 1] and s.class_names == ["a", "b"] and s.channels == ["x", "y"]
    m = s.metadata
    assert m["class"] == ["a", "b"] and m["plate"] == ["P1", "P1"] and m["well"] == ["A01", "B02"]
    assert m["compound"] == ["cmpd-P1-A01", "cmpd-P1-B02"] and m["replicate"] == [1, 1]
    assert "site" not in m and "image_number" not in m  # varies within a well: dropped
    assert m["source_indices"] == [[1, 2, 0, 5, 4, 3], [6, 7, 8, 9, 10, 11]]  # the source images in site order
    rec = s.info["montage"]
    assert rec["grid"] == [2, 3] and rec["order"] == "row" and rec["source"] == str((tmp_path / "src").resolve())
    assert rec["wells"] == 2 and rec["skipped_wells"] == [] and rec["dropped_columns"] == ["image_number"]
    assert rec["site_shape"] == [H, W, C] and s.info["source"] == "montage"


@pytest.mark.parametrize(
    "sites, match",
    [
        (SITES[:5] + SITES[6:], r"plate 'P1' well 'A01': missing site\(s\) \[4\].*--skip-incomplete"),
        (SITES + [("P1", "B02", 2, 1)], r"plate 'P1' well 'B02': site 2 appears 2 times \(images \[7, 12\]\)"),
        (SITES + [("P1", "B02", 7, 1)], r"plate 'P1' well 'B02': site\(s\) \[7\] outside 1..6.*grid right"),
        ([s[:3] + (1 if s[2] == 5 else 0,) for s in SITES[:6]], r"plate 'P1' well 'A01': sites of different classes"),
        ([("P1", "A01", "two", 0)] + SITES[1:6], r"plate 'P1' well 'A01' has site 'two', not a site number"),
    ],
    ids=["missing", "duplicate", "outside", "mixed-labels", "not-a-number"],
)
def test_bad_wells_are_errors_naming_them(tmp_path, sites, match):
    make_store(tmp_path / "src", sites)
    with pytest.raises(ImportDataError, match=match) as e:
        montage_store(tmp_path / "src", tmp_path / "dst", (2, 3), progress=False)
    assert str(tmp_path / "src") in str(e.value)
    assert not (tmp_path / "dst" / MARKER).exists()


def test_skip_incomplete_drops_and_counts(tmp_path, caplog):
    sites = SITES[:5] + SITES[6:] + [("P2", "C03", s, 0) for s in (1, 2)]
    make_store(tmp_path / "src", sites)
    caplog.set_level(logging.WARNING, logger="absl")
    s = open_store(montage_store(tmp_path / "src", tmp_path / "dst", (2, 3), skip_incomplete=True, progress=False))
    assert s.num_images == 1 and s.metadata["well"] == ["B02"] and list(s.labels) == [1]
    assert s.info["montage"]["skipped_wells"] == [["P1", "A01"], ["P2", "C03"]]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "left out 2 of 3 wells" in warning and "plate 'P2' well 'C03': missing site(s) [3, 4, 5, 6]" in warning
    make_store(tmp_path / "none", SITES[:5])
    with pytest.raises(ImportDataError, match="no well has all 6 sites"):
        montage_store(tmp_path / "none", tmp_path / "dst2", (2, 3), skip_incomplete=True, progress=False)


def test_bad_sources_name_the_path_and_column(tmp_path, data_tiny_store):
    src, _ = data_tiny_store
    with pytest.raises(ImportDataError, match=rf"{src}: the store's metadata has no 'plate' column"):
        montage_store(src, tmp_path / "dst", (2, 2), progress=False)
    make_store(tmp_path / "nosite", SITES, extra={"site": None})
    with pytest.raises(ImportDataError, match=r"nosite: the store's metadata has no 'site' column \(it has \["):
        montage_store(tmp_path / "nosite", tmp_path / "dst", (2, 3), progress=False)
    with pytest.raises(StoreError, match="does not exist"):
        montage_store(tmp_path / "absent", tmp_path / "dst", (2, 2), progress=False)
    make_store(tmp_path / "half", SITES)
    (tmp_path / "half" / MARKER).unlink()
    with pytest.raises(IncompleteStoreError, match=f"{tmp_path / 'half'} is incomplete"):
        montage_store(tmp_path / "half", tmp_path / "dst", (2, 3), progress=False)
    # a montage is not montaged again
    make_store(tmp_path / "ok", SITES)
    montage_store(tmp_path / "ok", tmp_path / "m", (2, 3), progress=False)
    with pytest.raises(ImportDataError, match="no 'site' column.*a montage already"):
        montage_store(tmp_path / "m", tmp_path / "mm", (2, 3), progress=False)


def test_interrupted_montage_is_not_complete_and_a_rerun_finishes_it(tmp_path, monkeypatch):
    sites = SITES + [("P2", w, s, 0) for w in ("A01", "A02") for s in range(1, 7)]
    images = make_store(tmp_path / "src", sites)
    stitch, calls = montage.stitch, []

    def failing(tiles, grid, order="row"):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")  # the montage stops in the middle (a crash, a Ctrl-C)
        return stitch(tiles, grid, order)

    monkeypatch.setattr(montage, "stitch", failing)
    with pytest.raises(RuntimeError, match="killed"):
        montage_store(tmp_path / "src", tmp_path / "dst", (2, 3), "snake", progress=False)
    with pytest.raises(IncompleteStoreError):
        open_store(tmp_path / "dst")
    calls.clear()
    montage_store(tmp_path / "src", tmp_path / "dst", (2, 3), "snake", progress=False)
    assert len(calls) == 2  # resumed: only the two wells not written before
    s = open_store(tmp_path / "dst")
    assert s.num_images == 4 and s.metadata["well"] == ["A01", "B02", "A01", "A02"]
    np.testing.assert_array_equal(tile(s.read([3])[0], 1, 2), images[12 + 6 + 3])  # P2 A02 site 4: row 2, right
    calls.clear()
    assert montage_store(tmp_path / "src", tmp_path / "dst", (2, 3), "snake", progress=False) == tmp_path / "dst"
    assert calls == []  # complete and of the same inputs: reused
    monkeypatch.setattr(montage, "stitch", stitch)
    with pytest.raises(StoreError, match="already holds a complete image store"):
        montage_store(tmp_path / "src", tmp_path / "dst", (2, 3), "row", progress=False)
    montage_store(tmp_path / "src", tmp_path / "dst", (2, 3), "row", overwrite=True, progress=False)
    assert open_store(tmp_path / "dst").info["montage"]["order"] == "row"
    with pytest.raises(ValueError, match="another store than its source"):
        montage_store(tmp_path / "src", tmp_path / "src", (2, 3), overwrite=True, progress=False)


def test_cli_end_to_end(tmp_path, capsys):
    images = make_store(tmp_path / "src", SITES)
    argv = ["montage", str(tmp_path / "src"), "--out", str(tmp_path / "dst"), "--grid", "2x3"]
    assert main([*argv, "--order", "snake", "--codec", "zstd1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 of 16x18x2 uint16" in out and f"montage     2x3 sites a well (snake order) of {tmp_path / 'src'}" in out
    s = open_store(tmp_path / "dst")
    assert s.info["codec"] == "zstd1"
    np.testing.assert_array_equal(tile(s.read([1])[0], 1, 0), images[6 + 5])  # B02 site 6: snake, bottom left
    with pytest.raises(SystemExit) as e:
        main([*argv[:-1], "2by3"])
    assert e.value.code == 2 and "--grid: a montage grid is ROWSxCOLS" in capsys.readouterr().err
    make_store(tmp_path / "gap", SITES[1:])
    gap = ["montage", str(tmp_path / "gap"), "--out", str(tmp_path / "g"), "--grid", "2x3", "--quiet"]
    assert main(gap) == 1
    assert "plate 'P1' well 'A01': missing site(s) [3]" in capsys.readouterr().err
    assert main([*gap, "--skip-incomplete"]) == 0
    assert "1 incomplete well(s) left out: P1 A01" in capsys.readouterr().out


def test_prepare_store_with_a_montage_of_the_synthetic_screen(tmp_path):
    from mcnn_jax.data.prepare import prepare_store, source_path, store_path
    from mcnn_jax.parallel.world import World

    overrides = [
        "data.synthetic.num_images=13",  # rounded up to 16: 4 whole wells of 2 classes
        "data.synthetic.num_classes=2",
        "data.synthetic.height=32",
        "data.synthetic.width=48",
        "data.montage.grid=2x2",
        "data.montage.order=snake",
    ]
    cfg = load_config("tiny", overrides)
    s = prepare_store(cfg, tmp_path, World())
    assert s.path == store_path(cfg, tmp_path) == tmp_path / "data" / "montage-2x2-snake"
    assert s.num_images == 4 and s.image_shape == (64, 96, 3) and s.info["montage"]["skipped_wells"] == []
    src = open_store(source_path(cfg, tmp_path))
    assert src.num_images == 16 and sorted(s.class_counts().values()) == [2, 2]
    for k in range(4):
        idx = s.metadata["source_indices"][k]
        assert [src.metadata["site"][i] for i in idx] == [1, 2, 3, 4]
        np.testing.assert_array_equal(s.read([k])[0][32:, :48], src.read([idx[3]])[0])  # site 4: bottom left
    assert prepare_store(cfg, tmp_path, World()).info["created"] == s.info["created"]  # reused
    with pytest.raises(ValueError, match="data.montage.grid='3x3' has 9 sites a well.*use 2x2, 1x4 or 4x1"):
        prepare_store(load_config("tiny", [*overrides, "data.montage.grid=3x3"]), tmp_path, World())
    with pytest.raises(ValueError, match="data.montage.grid: a montage grid is ROWSxCOLS"):
        prepare_store(load_config("tiny", [*overrides, "data.montage.grid=2"]), tmp_path, World())
    with pytest.raises(ValueError, match="data.montage.order must be one of"):
        prepare_store(load_config("tiny", [*overrides, "data.montage.order=spiral"]), tmp_path, World())


def test_a_real_stores_montage_lives_beside_it(tmp_path):
    from mcnn_jax.data.prepare import prepare_store, store_path
    from mcnn_jax.parallel.world import World

    make_store(tmp_path / "screen.store", SITES)
    cfg = load_config("tiny", [f"data.store={tmp_path / 'screen.store'}", "data.montage.grid=2x3"])
    s = prepare_store(cfg, tmp_path / "run", World())
    assert s.path == store_path(cfg, tmp_path / "run") == tmp_path / "screen.store.montage-2x3-row"
    cfg = load_config(
        "tiny",
        [f"data.store={tmp_path / 'screen.store'}", "data.montage.grid=2x3", f"data.montage.store={tmp_path / 'm'}"],
    )
    assert prepare_store(cfg, tmp_path / "run", World()).path == tmp_path / "m"


def test_the_trainer_never_replaces_a_complete_montage_of_other_inputs(tmp_path):
    """A montage of another grid, order or codec at the config's montage folder is an error naming it, not rebuilt
    under a reader; with data.montage.skip_incomplete the default folder is another one."""
    from mcnn_jax.data.prepare import prepare_store, store_path
    from mcnn_jax.parallel.world import World

    make_store(tmp_path / "screen.store", SITES)
    keys = [f"data.store={tmp_path / 'screen.store'}", "data.montage.grid=2x3"]
    cfg = load_config("tiny", keys)
    dst = store_path(cfg, tmp_path / "run")
    montage_store(tmp_path / "screen.store", dst, (2, 3), "row", codec="zstd1", progress=False)  # a user's own codec
    created = open_store(dst).info["created"]
    with pytest.raises(StoreError, match=f"{dst} already holds a complete montage of other inputs.*data.montage.store"):
        prepare_store(cfg, tmp_path / "run", World())
    assert open_store(dst).info["created"] == created  # untouched
    skip = load_config("tiny", [*keys, "data.montage.skip_incomplete=True"])
    assert store_path(skip, tmp_path / "run") == tmp_path / "screen.store.montage-2x3-row-skip-incomplete"


def test_a_montage_in_the_work_directory_is_found_again_when_the_stores_folder_is_writable(tmp_path):
    """A run that built its montage in <workdir>/data (the store's folder was read-only then) reads it back from
    there later, though the store's folder is writable now."""
    from mcnn_jax.data.prepare import store_path

    make_store(tmp_path / "screen.store", SITES)
    cfg = load_config("tiny", [f"data.store={tmp_path / 'screen.store'}", "data.montage.grid=2x3"])
    own = tmp_path / "run" / "data" / "montage-2x3-row"
    assert store_path(cfg, tmp_path / "run") == tmp_path / "screen.store.montage-2x3-row"  # nothing built yet
    montage_store(tmp_path / "screen.store", own, (2, 3), progress=False)
    assert store_path(cfg, tmp_path / "run") == own


def test_whole_wells_of_the_synthetic_layout():
    from mcnn_jax.data.synthetic import SITES_PER_WELL, layout, whole_well_images

    assert whole_well_images(13, 2) == 16 and whole_well_images(16, 2) == 16 and whole_well_images(1, 3) == 12
    wells = {}
    for site in layout(whole_well_images(50, 3), 3, seed=1):
        wells.setdefault((site.plate, site.well), []).append(site.site)
    assert all(sorted(v) == list(range(1, SITES_PER_WELL + 1)) for v in wells.values())


def test_the_montage_config_trains_on_its_montage_size():
    cfg = load_config(str(REPO / "configs" / "montage.py"))
    rows, cols = parse_grid(cfg.data.montage.grid)
    syn = cfg.data.synthetic
    assert tuple(cfg.model.input_shape) == (rows * syn.height, cols * syn.width, 3)
    assert syn.num_images % (rows * cols * syn.num_classes) == 0  # whole wells as it is: nothing rounded


def test_loco_folds_train_on_the_prepared_store_as_it_is(tmp_path, monkeypatch):
    """A fold gets the prepared (montage) store as data.store, and no second montage of it."""
    from mcnn_jax.evaluation import loco

    seen = []
    monkeypatch.setattr(loco.subprocess, "run", lambda cmd: seen.append(cmd) or type("P", (), {"returncode": 0}))
    monkeypatch.setattr(loco, "check_trained", lambda *a: None)
    loco.train_fold("configs/montage.py", tmp_path, tmp_path / "m", "x", ["data.montage.grid=2x2"])
    assert seen[0][-1] == "--config.data.montage.grid=" and f"--config.data.store={tmp_path / 'm'}" in seen[0]
