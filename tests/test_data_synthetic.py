import time

import numpy as np
import pytest

from mcnn_jax.data import open_store, prepare_synthetic_store
from mcnn_jax.data import synthetic as S
from mcnn_jax.data.bbbc021 import read_metadata
from mcnn_jax.data.store import MARKER, is_complete


def test_layout_balances_classes_and_compounds():
    sites = S.layout(200, 5, seed=0)
    assert len(sites) == 200 and [s.image_number for s in sites] == list(range(1, 201))
    per_class = np.bincount([s.class_index for s in sites])
    assert per_class.max() - per_class.min() <= 1
    for c in range(1, 5):
        assert len({s.compound for s in sites if s.class_index == c}) == 3
    assert {s.compound for s in sites if s.class_index == 0} == {"DMSO"}
    assert {s.site for s in sites} == {1, 2, 3, 4}
    with pytest.raises(ValueError):
        S.layout(3, 5, seed=0)


def test_screen_is_deterministic_and_readable_by_the_bbbc021_importer(tmp_path):
    a = S.generate_screen(tmp_path / "a", 12, 3, 64, 80, seed=5, progress=False)
    b = S.generate_screen(tmp_path / "b", 12, 3, 64, 80, seed=5, progress=False)
    rows = read_metadata(a)
    assert len(rows) == 12 and {r.moa for r in rows} == {"DMSO", "coarse-dense", "middle-large_nuclei"}
    for r in rows[:3]:
        for f in r.files:
            assert (a / f).read_bytes() == (b / f).read_bytes()
    assert (a / "BBBC021_v1_image.csv").read_bytes() == (b / "BBBC021_v1_image.csv").read_bytes()
    c = S.generate_screen(tmp_path / "c", 12, 3, 64, 80, seed=6, progress=False)
    assert (a / rows[0].files[0]).read_bytes() != (c / read_metadata(c)[0].files[0]).read_bytes()


def _foreground(img, ch):
    return float((img[ch] > 500).mean())


def test_phenotypes_differ_from_control_at_their_scale():
    """Each mechanism moves its own statistic away from DMSO by a clear margin (averaged over fields)."""
    h = w = 256

    def mean_stat(c, fn, n=6):
        return np.mean(
            [fn(S.render_field(np.random.default_rng([c, i]), h, w, S.phenotype_params(c))) for i in range(n)]
        )

    dapi_area = lambda x: _foreground(x, 0)  # noqa: E731
    cell_area = lambda x: _foreground(x, 1)  # noqa: E731
    names = S.class_names(11)
    idx = {n: k for k, n in enumerate(names)}
    assert mean_stat(idx["coarse-dense"], cell_area) > 1.6 * mean_stat(0, cell_area)
    assert mean_stat(idx["coarse-sparse"], cell_area) < 0.6 * mean_stat(0, cell_area)
    assert mean_stat(idx["middle-large_nuclei"], dapi_area) > 2.0 * mean_stat(0, dapi_area)
    assert mean_stat(idx["middle-condensed"], dapi_area) < 0.6 * mean_stat(0, dapi_area)
    bright = lambda x: float((x[2] > 1500).mean())  # noqa: E731  actin puncta
    assert mean_stat(idx["fine-puncta"], bright) > 3 * mean_stat(0, bright)

    def fine_energy(x):  # high-frequency tubulin energy per cell pixel
        t = x[1].astype(np.float32)
        d = np.abs(np.diff(t, axis=1)).sum()
        return d / max(1.0, (t > 500).sum())

    assert mean_stat(idx["fine-filaments"], fine_energy) > 1.5 * mean_stat(0, fine_energy)


def test_prepare_is_idempotent_and_resumes(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    p = prepare_synthetic_store(root, 16, 4, 64, 64, seed=1, progress=False)
    s = open_store(p)
    assert s.num_images == 16 and s.image_shape == (64, 64, 3) and len(s.class_names) == 4
    first = s.read(range(16))
    marker_time = (p / MARKER).stat().st_mtime_ns
    t = time.perf_counter()
    assert prepare_synthetic_store(root, 16, 4, 64, 64, seed=1, progress=False) == p
    assert time.perf_counter() - t < 1.0 and (p / MARKER).stat().st_mtime_ns == marker_time
    # an interrupted import: the marker is gone and some chunks are missing -> a rerun finishes it
    (p / MARKER).unlink()
    import shutil

    shutil.rmtree(p / "images.zarr" / "c" / "5")
    assert not is_complete(p)
    prepare_synthetic_store(root, 16, 4, 64, 64, seed=1, progress=False)
    np.testing.assert_array_equal(open_store(p).read(range(16)), first)
    # other parameters rebuild the store
    s2 = open_store(prepare_synthetic_store(root, 20, 4, 64, 64, seed=1, progress=False))
    assert s2.num_images == 20


def test_realistic_camera_flat_saturated_8bit(tmp_path):
    """The camera option gives what real fields have: an exactly flat background, saturated objects, 8-bit
    levels; the store keeps them (no illumination correction), and the default camera is unchanged."""
    cam = S.Camera(background="flat", saturation=1500, bits=8)
    rng = lambda: np.random.default_rng([0, 5])  # noqa: E731
    img = S.render_field(rng(), 64, 80, S.phenotype_params(2), None, cam)
    assert img.dtype == np.uint8
    values, counts = np.unique(img, return_counts=True)
    assert counts.max() / img.size > 0.5  # one background level covers most of the field
    assert (img == 1500 // 16).any()  # saturated pixels, all at the clip level
    assert img.max() == 1500 // 16
    default = S.render_field(rng(), 64, 80, S.phenotype_params(2))
    assert np.unique(default).size > 200  # the default camera: noise everywhere
    with pytest.raises(ValueError, match="background"):
        S.Camera(background="dark")
    store = open_store(prepare_synthetic_store(tmp_path / "r", 16, 4, 128, 128, seed=1, progress=False, camera=cam))
    images = store.read(list(range(4)))
    zeros = (images == 0).mean()
    assert zeros > 0.4, zeros  # the flat background maps to exactly 0 after per-plate scaling
    assert (images == np.iinfo(images.dtype).max).mean() > 0.001  # saturated objects stay flat at the top
    assert store.info["synthetic"]["camera"] == dict(background="flat", saturation=1500, bits=8)


def test_layout_has_weeks_as_bbbc021():
    """Each compound in one week (batch), the compounds of a mechanism in different weeks, DMSO on every plate,
    plate names Week<k>_<id> and one image per (plate, well, site)."""
    sites = S.layout(640, 8, seed=0, wells_per_plate=20)
    weeks = {}
    for s in sites:
        weeks.setdefault(s.compound, set()).add(s.week)
    assert all(len(w) == 1 for c, w in weeks.items() if c != "DMSO") and weeks["DMSO"] == {1, 2, 3}
    for c in range(1, 8):
        assert len({next(iter(weeks[n])) for n in S.compound_names(c, 3)}) == 3
    plates = {s.plate for s in sites}
    assert len(plates) > 3 and all(any(s.compound == "DMSO" for s in sites if s.plate == p) for p in plates)
    assert len({(s.plate, s.well, s.site) for s in sites}) == len(sites)
    assert S._plate_dir(sites[0])[1] == f"Week{sites[0].week}_{20000 + sites[0].plate}"


def test_difficulty_weakens_the_phenotypes_and_adds_noise():
    """difficulty 0 is the nominal screen; at 1 the dense class's cell density is closer to DMSO's, varies from
    image to image, and the pixels are noisier; outside [0, 1] is an error."""
    rng = lambda i: np.random.default_rng([5, i])  # noqa: E731
    dense = S.class_names(2).index("coarse-dense")
    assert S.hard_params(dense, 1.0, 0.0, rng(0)) == S.phenotype_params(dense, 1.0)
    control, nominal = S.BASE["density"], S.phenotype_params(dense, 1.0)["density"]
    hard = [S.hard_params(dense, 1.0, 1.0, rng(i)) for i in range(20)]
    densities = np.array([p["density"] for p in hard])
    assert (densities < nominal).all() and densities.min() < 1.15 * control < nominal and densities.std() > 0
    assert all(p["noise"] == 250.0 for p in hard)
    quiet = S.render_field(rng(1), 128, 128, S.phenotype_params(0))
    noisy = S.render_field(rng(1), 128, 128, dict(S.phenotype_params(0), noise=250.0))
    assert np.diff(noisy[0].astype(np.float32), axis=1).std() > 2 * np.diff(quiet[0].astype(np.float32), axis=1).std()
    with pytest.raises(ValueError, match="difficulty must be in"):
        S.hard_params(dense, 1.0, 1.5, rng(0))
