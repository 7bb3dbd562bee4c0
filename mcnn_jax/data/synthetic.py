"""A synthetic high-content screen in the BBBC021 layout: the project's embedded demo data set.

``generate_screen(out, ...)`` writes plate folders of single-channel 16-bit TIFFs (DAPI ``w1``, tubulin ``w2``,
actin ``w4``) plus ``BBBC021_v1_image.csv`` and ``BBBC021_v1_moa.csv`` with the Broad's column names, so the
BBBC021 importer reads it unchanged. Everything is deterministic given the seed: image ``i`` is rendered from
``default_rng([seed, i])`` alone, so a rerun (or a resumed run) writes the same pixels.

Each field holds cells drawn as soft ellipses: a nucleus (DAPI), a cytoplasm with a band-pass "filament"
texture (tubulin), and a cortex ring with puncta (actin); then an uneven per-plate illumination field, a
camera offset and shot / read noise. Class 0 is the ``DMSO`` control. Every other class ("mechanism") moves
one phenotype away from the control, and the phenotypes live at three scales, interleaved so that any subset
of the first classes needs several scales to be told apart:

- coarse (the whole field): cell density up / down, cells clustered in colonies;
- middle (one cell): large or condensed nuclei, spread cells, elongated cells;
- fine (a few pixels): actin puncta, multinucleated cells, fine high-contrast tubulin texture.

Beyond the ten phenotypes, classes reuse them at a higher strength (``coarse-dense-2``, ...). Each mechanism has
``compounds_per_class`` compounds with slightly different potency and ``concentrations`` concentrations, so that
leave-one-compound-out validation works. As in BBBC021, each compound is imaged in one of three weeks (batches;
plates ``Week<k>_<id>``, several per week when the screen is large), the compounds of one mechanism in different
weeks, and every plate has DMSO wells, so that NSC / NSCB matching and per-plate normalisation apply. Cell sizes
are in pixels (as a microscope would see them), so a small field is a crop of a large one; at 256x256 a field has
~20 control cells.

``difficulty`` (0..1; ``data.synthetic.difficulty``) makes a harder screen: weaker phenotypes that vary from
image to image, so that classes overlap, and more noise (``hard_params``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from mcnn_jax.data._util import atomic_write_json, write_csv
from mcnn_jax.data._util import progress as progress_bar
from mcnn_jax.data.bbbc021 import IMAGE_COLUMNS, IMAGE_CSV, MOA_COLUMNS, MOA_CSV, import_bbbc021
from mcnn_jax.data.store import StoreError, is_complete, open_store

MARKER = ".synthetic_complete.json"
SITES_PER_WELL = 4
GENERATOR_VERSION = 3  # bump when the rendering changes: finished screens / stores of another version are rebuilt
ROWS, COLS = "BCDEFG", range(2, 12)  # 60 wells per plate, as the treated wells of a BBBC021 plate

# (phenotype, scale), interleaved by scale
PHENOTYPES = (
    ("dense", "coarse"),
    ("large_nuclei", "middle"),
    ("puncta", "fine"),
    ("clustered", "coarse"),
    ("elongated", "middle"),
    ("multinucleated", "fine"),
    ("sparse", "coarse"),
    ("spread", "middle"),
    ("filaments", "fine"),
    ("condensed", "middle"),
)


def class_names(num_classes: int) -> list[str]:
    """``DMSO`` then one mechanism name per class, e.g. ``coarse-dense``, ``middle-large_nuclei``, ..."""
    if num_classes < 2:
        raise ValueError(f"a synthetic screen needs at least 2 classes (DMSO + one mechanism), got {num_classes}")
    names = ["DMSO"]
    for k in range(1, num_classes):
        name, scale = PHENOTYPES[(k - 1) % len(PHENOTYPES)]
        level = (k - 1) // len(PHENOTYPES)
        names.append(f"{scale}-{name}" + (f"-{level + 1}" if level else ""))
    return names


# ---------------------------------------------------------------------------------------------------------
# phenotype parameters

BASE = dict(
    density=3.0e-4,
    cluster=0.0,
    rn=6.0,
    rc=15.0,
    aspect_c=1.25,
    aspect_n=1.1,
    p_multi=0.0,
    puncta=2.0,
    tex_freq=0.07,
    tex_contrast=0.3,
    dapi=1.0,
)


def phenotype_params(class_index: int, strength: float = 1.0) -> dict:
    """The rendering parameters of a class at a given strength (1 = the nominal phenotype; DMSO ignores it)."""
    p = dict(BASE)
    if class_index == 0:
        return p
    name, _ = PHENOTYPES[(class_index - 1) % len(PHENOTYPES)]
    s = strength * (1.0 + 0.75 * ((class_index - 1) // len(PHENOTYPES)))
    if name == "dense":
        p["density"] *= 2.3**s
    elif name == "sparse":
        p["density"] *= 0.4**s
    elif name == "clustered":
        p["cluster"] = min(1.0, 0.95 * s)
    elif name == "large_nuclei":
        p["rn"] *= 1.9**s
    elif name == "condensed":
        p["rn"] *= 0.55**s
        p["dapi"] *= 2.0
    elif name == "spread":
        p["rc"] *= 1.55**s
    elif name == "elongated":
        p["aspect_c"] *= 2.3**s
        p["aspect_n"] *= 1.5**s
    elif name == "puncta":
        p["puncta"] = 2.0 + 25.0 * s
    elif name == "multinucleated":
        p["p_multi"] = min(1.0, 0.95 * s)
    elif name == "filaments":
        p["tex_freq"] = 0.25
        p["tex_contrast"] = min(1.3, 1.0 * s)
    return p


def hard_params(class_index: int, strength: float, difficulty: float, rng: np.random.Generator) -> dict:
    """``phenotype_params`` of a harder screen: at ``difficulty`` d in [0, 1] the phenotypes are weaker (strength
    x (1 - 0.7 d)) and vary more from image to image (x U(1 - 0.6 d, 1 + 0.6 d), so classes overlap), and every
    pixel gets Gaussian noise of 250 d counts (``noise``). d = 0 is the nominal screen."""
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"the synthetic screen's difficulty must be in [0, 1], got {difficulty}")
    if difficulty == 0:
        return phenotype_params(class_index, strength)
    strength *= (1.0 - 0.7 * difficulty) * rng.uniform(1.0 - 0.6 * difficulty, 1.0 + 0.6 * difficulty)
    return dict(phenotype_params(class_index, strength), noise=250.0 * difficulty)


# ---------------------------------------------------------------------------------------------------------
# the camera: how realistic the recorded pixels are

BACKGROUNDS = ("noisy", "offset", "flat")
BITS = (16, 12, 8)


@dataclass(frozen=True)
class Camera:
    """How a field is recorded. The default is a 16-bit camera with shot and read noise everywhere. Real fields
    are often harsher, and these options make them so (they are what breaks naive max-pool gradients):

    - ``background``: ``"noisy"`` (offset + noise on every pixel), ``"offset"`` (a flat camera offset with read
      noise on 3% of the pixels, shot noise on the signal) or ``"flat"`` (exactly constant where there is no
      signal; noise only on the signal);
    - ``saturation``: the full-well level in counts, above which pixels clip (0 = only the dtype clips);
    - ``bits``: 16, 12 (values clipped to 4095) or 8 (an 8-bit export of a 12-bit camera: value // 16, stored
      as uint8 TIFFs).
    """

    background: str = "noisy"
    saturation: int = 0
    bits: int = 16

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"camera background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.bits not in BITS:
            raise ValueError(f"camera bits must be one of {BITS}, got {self.bits!r}")
        if self.saturation < 0:
            raise ValueError(f"camera saturation must be >= 0 counts (0 = off), got {self.saturation}")

    @property
    def realistic(self) -> bool:
        return self != Camera()

    def record(self, rng: np.random.Generator, signal: np.ndarray) -> np.ndarray:
        """Camera counts (uint16, or uint8 for 8 bits) of a float signal (photo-electrons above the offset)."""
        img = signal + 110.0
        shot = np.sqrt(img * 0.6) * rng.standard_normal(img.shape, dtype=np.float32)
        read = 6.0 * rng.standard_normal(img.shape, dtype=np.float32)
        if self.background == "noisy":
            img = img + shot + read
        else:
            on_signal = signal > 0.5
            img = img + np.where(on_signal, shot, 0.0)
            if self.background == "offset":
                img += np.where(~on_signal & (rng.random(img.shape) < 0.03), np.rint(np.abs(read)), 0.0)
            else:
                img += np.where(on_signal, read, 0.0)
        top = 65535 if self.bits == 16 else 4095
        if self.saturation:
            top = min(top, self.saturation)
        img = np.clip(img, 0, top)  # truncated to integers below, as a camera's ADC does
        if self.bits == 8:
            return (img // 16).astype(np.uint8)
        return img.astype(np.uint16)


# ---------------------------------------------------------------------------------------------------------
# rendering


def _stamp(h: int, w: int, cy, cx, half: int, values) -> np.ndarray:
    """Adds ``values[n]`` (patches of (2*half+1)^2 centred on integer pixels (cy[n], cx[n])) into an h x w image."""
    p = 2 * half + 1
    wp = w + 2 * half
    cy, cx = np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1)  # centres that fell outside the field
    ar = np.arange(p)
    flat = ((cy[:, None, None] + ar[None, :, None]) * wp + (cx[:, None, None] + ar[None, None, :])).ravel()
    canvas = np.bincount(flat, weights=values.ravel(), minlength=(h + 2 * half) * wp)
    return canvas.reshape(h + 2 * half, wp)[half : half + h, half : half + w]


def _ellipses(h, w, y, x, a, b, theta, amp, edge: float = 1.2) -> np.ndarray:
    """Soft-edged filled ellipses (semi-axes a, b, angle theta, amplitude amp) summed into an h x w image."""
    if len(y) == 0:
        return np.zeros((h, w))
    half = int(math.ceil(max(a.max(), b.max()) + 2 * edge))
    cy, cx = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    g = np.arange(-half, half + 1, dtype=np.float32)
    dy = g[None, :, None] - (y - cy)[:, None, None].astype(np.float32)
    dx = g[None, None, :] - (x - cx)[:, None, None].astype(np.float32)
    c, s = np.cos(theta)[:, None, None].astype(np.float32), np.sin(theta)[:, None, None].astype(np.float32)
    u = (dx * c + dy * s) / a[:, None, None].astype(np.float32)
    v = (-dx * s + dy * c) / b[:, None, None].astype(np.float32)
    r = np.sqrt(u * u + v * v)
    dist = (1.0 - r) * np.minimum(a, b)[:, None, None].astype(np.float32)  # approx. distance inside the edge
    vals = np.clip(0.5 + dist / edge, 0.0, 1.0) * amp[:, None, None].astype(np.float32)
    return _stamp(h, w, cy, cx, half, vals)


def _gaussians(h, w, y, x, sigma: float, amp) -> np.ndarray:
    if len(y) == 0:
        return np.zeros((h, w))
    half = int(math.ceil(3 * sigma))
    cy, cx = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    g = np.arange(-half, half + 1, dtype=np.float32)
    dy = g[None, :, None] - (y - cy)[:, None, None].astype(np.float32)
    dx = g[None, None, :] - (x - cx)[:, None, None].astype(np.float32)
    vals = np.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma)) * amp[:, None, None].astype(np.float32)
    return _stamp(h, w, cy, cx, half, vals)


def _bandpass_noise(rng, h, w, freq: float, width: float = 0.35) -> np.ndarray:
    """Isotropic band-pass noise around ``freq`` cycles/pixel, normalised to zero mean and unit variance."""
    spec = np.fft.rfft2(rng.standard_normal((h, w), dtype=np.float32))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    filt = np.exp(-((np.log(np.maximum(f, 1e-6) / freq)) ** 2) / (2 * width**2))
    out = np.fft.irfft2(spec * filt, s=(h, w))
    out -= out.mean()
    return (out / (out.std() + 1e-8)).astype(np.float32)


def illumination_field(h: int, w: int, plate_seed) -> np.ndarray:
    """A smooth per-plate vignetting field in [~0.6, 1] with a plate-specific centre."""
    rng = np.random.default_rng(plate_seed)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    strength = rng.uniform(0.25, 0.4)
    yy = ((np.arange(h) - cy) / (0.75 * max(h, w)))[:, None]
    xx = ((np.arange(w) - cx) / (0.75 * max(h, w)))[None, :]
    return (1.0 - strength * np.minimum(yy * yy + xx * xx, 1.0)).astype(np.float32)


def render_field(
    rng: np.random.Generator, h: int, w: int, params: dict, illumination=None, camera: Camera = Camera()
) -> np.ndarray:
    """Renders one 3-channel (DAPI, tubulin, actin) field as [3, h, w] camera counts (uint16; uint8 for an
    8-bit camera)."""
    p = params
    # --- coarse: how many cells, where ---------------------------------------------------------------------
    n = max(1, int(round(p["density"] * h * w * rng.uniform(0.9, 1.1))))
    y = rng.uniform(0, h, n)
    x = rng.uniform(0, w, n)
    n_clustered = int(round(p["cluster"] * n))
    if n_clustered:
        k = max(1, int(round(n_clustered / 25)))
        centres = np.stack([rng.uniform(0.15, 0.85, k) * h, rng.uniform(0.15, 0.85, k) * w], 1)
        which = rng.integers(0, k, n_clustered)
        spread = 1.6 * p["rc"] * math.sqrt(max(n_clustered / k, 1.0)) / 2.5
        y[:n_clustered] = np.clip(centres[which, 0] + rng.normal(0, spread, n_clustered), 0, h - 1)
        x[:n_clustered] = np.clip(centres[which, 1] + rng.normal(0, spread, n_clustered), 0, w - 1)
    # --- middle: cell and nucleus size and shape ----------------------------------------------------------
    theta = rng.uniform(0, np.pi, n)
    rc = p["rc"] * rng.uniform(0.85, 1.15, n)
    ac = np.sqrt(p["aspect_c"])
    cell_a, cell_b = rc * ac, rc / ac
    rn = p["rn"] * rng.uniform(0.85, 1.15, n)
    an = np.sqrt(p["aspect_n"])
    # --- fine: multinucleation ----------------------------------------------------------------------------
    nuclei = np.where(rng.random(n) < p["p_multi"], rng.integers(2, 4, n), 1)
    cell_of = np.repeat(np.arange(n), nuclei)
    j = np.concatenate([np.arange(m) - (m - 1) / 2 for m in nuclei])
    scale = np.where(nuclei[cell_of] > 1, 0.75, 1.0)  # several nuclei in one cell are each smaller
    off = j * 1.7 * rn[cell_of] * scale
    ny = y[cell_of] + off * np.sin(theta[cell_of])
    nx = x[cell_of] + off * np.cos(theta[cell_of])
    na, nb = rn[cell_of] * an * scale, rn[cell_of] / an * scale
    dapi_amp = 1400.0 * p["dapi"] * rng.uniform(0.8, 1.2, len(ny))
    dapi = _ellipses(h, w, ny, nx, na, nb, theta[cell_of], dapi_amp)
    dapi *= 1.0 + 0.15 * _bandpass_noise(rng, h, w, 0.2)  # chromatin texture
    nucleus_mask = np.minimum(dapi / 1000.0, 1.0)
    # --- tubulin: cytoplasm with a filament texture -------------------------------------------------------
    body = _ellipses(h, w, y, x, cell_a, cell_b, theta, rng.uniform(0.8, 1.2, n))
    body = np.minimum(body, 1.3)
    tex = np.maximum(1.0 + p["tex_contrast"] * _bandpass_noise(rng, h, w, p["tex_freq"]), 0.0)
    tubulin = 800.0 * body * tex * (1.0 - 0.5 * nucleus_mask)
    # --- actin: cortex ring and puncta --------------------------------------------------------------------
    inner = _ellipses(h, w, y, x, np.maximum(cell_a - 3.0, 1.0), np.maximum(cell_b - 3.0, 1.0), theta, np.ones(n))
    ring = np.clip(body - inner, 0.0, None)
    actin = 300.0 * body + 900.0 * ring
    m = rng.poisson(p["puncta"], n)
    pc = np.repeat(np.arange(n), m)
    rad = np.sqrt(rng.random(len(pc))) * 0.8
    ang = rng.uniform(0, 2 * np.pi, len(pc))
    u, v = rad * np.cos(ang) * cell_a[pc], rad * np.sin(ang) * cell_b[pc]
    c, s = np.cos(theta[pc]), np.sin(theta[pc])
    actin += _gaussians(h, w, y[pc] + u * s + v * c, x[pc] + u * c - v * s, 1.0, rng.uniform(1500, 2500, len(pc)))
    # --- optics and camera --------------------------------------------------------------------------------
    img = np.stack([dapi, tubulin, actin]).astype(np.float32)
    img *= rng.uniform(0.9, 1.1, (3, 1, 1)).astype(np.float32)
    if illumination is not None:
        img *= illumination[None]
    if p.get("noise"):  # a harder screen (hard_params)
        img = np.maximum(img + p["noise"] * rng.standard_normal(img.shape, dtype=np.float32), 0.0)
    return camera.record(rng, img)


# ---------------------------------------------------------------------------------------------------------
# the screen layout


@dataclass(frozen=True)
class Site:
    """One image of the synthetic screen (one field of view of one well)."""

    image_number: int  # global, 1-based; also the rendering seed
    plate: int  # 1-based
    well: str
    site: int
    class_index: int
    compound: str
    concentration: float
    strength: float
    week: int = 1  # the batch: plate names are Week<week>_<20000 + plate>


def compound_names(class_index: int, compounds_per_class: int) -> list[str]:
    if class_index == 0:
        return ["DMSO"]
    return [f"cmpd{class_index:02d}{chr(ord('a') + j)}" for j in range(compounds_per_class)]


def layout(
    num_images: int,
    num_classes: int,
    seed: int,
    compounds_per_class: int = 3,
    concentrations: int = 2,
    wells_per_plate: int = 60,
    weeks: int = 3,
) -> list[Site]:
    """Assigns every image a class, compound, concentration, week, plate, well and site (4 sites per well).

    As in BBBC021, a compound is imaged in one week (the batch): compound j of class c in week
    (c - 1 + j) mod ``weeks``, so the compounds of one mechanism sit in different weeks; DMSO control wells are
    spread over every week and every plate. Each week fills its own plates (``wells_per_plate`` wells each)."""
    if num_images < num_classes:
        raise ValueError(f"num_images ({num_images}) must be at least num_classes ({num_classes})")
    if compounds_per_class < 1 or concentrations < 1 or weeks < 1:
        raise ValueError("compounds_per_class, concentrations and weeks must be >= 1")
    rng = np.random.default_rng([seed, 7919])
    wells = []  # (week, class, compound, concentration, strength, n_sites)
    for c in range(num_classes):
        n_c = num_images // num_classes + (1 if c < num_images % num_classes else 0)
        treatments = []
        for ci, name in enumerate(compound_names(c, compounds_per_class)):
            if c == 0:
                treatments.append((None, name, 0.0, 1.0))
                continue
            potency = 0.85 + 0.3 * ci / max(1, compounds_per_class - 1)
            for k in range(concentrations):
                conc = float(f"{0.3 * 3.0**k * (1 + ci):.4g}")
                treatments.append(
                    ((c - 1 + ci) % weeks, name, conc, potency * (0.9 + 0.2 * k / max(1, concentrations - 1)))
                )
        for wi in range(math.ceil(n_c / SITES_PER_WELL)):
            week, *t = treatments[wi % len(treatments)]
            wells.append((wi % weeks if week is None else week, c, *t, min(SITES_PER_WELL, n_c - wi * SITES_PER_WELL)))
    well_names = [f"{r}{col:02d}" for r in ROWS for col in COLS][:wells_per_plate]
    sites, plate = [], 0
    for week in range(weeks):
        mine = [wells[i] for i in rng.permutation(len(wells)) if wells[i][0] == week]
        mine.sort(key=lambda w: w[1] != 0)  # controls first, dealt round-robin: every plate gets some
        n_plates = math.ceil(len(mine) / wells_per_plate)
        plates = [mine[p::n_plates] for p in range(n_plates)]
        for members in plates:
            plate += 1
            for pos, slot in enumerate(rng.permutation(len(members))):
                _, c, compound, conc, strength, n_sites = members[slot]
                sites += [
                    Site(0, plate, well_names[pos], s + 1, c, compound, conc, strength, week + 1)
                    for s in range(n_sites)
                ]
    return [dataclasses.replace(x, image_number=i + 1) for i, x in enumerate(sites)]


def whole_well_images(num_images: int, num_classes: int) -> int:
    """The smallest number of images >= ``num_images`` for which ``layout`` gives every well all its
    ``SITES_PER_WELL`` sites: a multiple of SITES_PER_WELL x num_classes (each class then fills whole wells)."""
    per = SITES_PER_WELL * num_classes
    return max(1, math.ceil(num_images / per)) * per


def _plate_dir(site: Site) -> tuple[str, str]:
    name = f"Week{site.week}_{20000 + site.plate}"
    return f"Week{site.week}/{name}", name


def _uuid(rng) -> str:
    h = rng.bytes(16).hex().upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def file_names(site: Site, seed: int) -> tuple[str, str, str]:
    rng = np.random.default_rng([seed, site.image_number, 17])
    return tuple(f"{site.well}_s{site.site}_w{w}{_uuid(rng)}.tif" for w in (1, 2, 4))


def _write_tiff(path: Path, img: np.ndarray) -> None:
    buf = _tiff_bytes(img)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf)
    os.replace(tmp, path)


def _tiff_bytes(img: np.ndarray) -> bytes:
    import io

    b = io.BytesIO()
    tifffile.imwrite(b, img, photometric="minisblack")
    return b.getvalue()


def _recorded(path: Path, key: str | None = None):
    """The JSON in ``path`` (its ``key`` entry if given), or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
        return data.get(key) if key else data
    except (OSError, ValueError, AttributeError):
        return None


def generate_screen(
    out,
    num_images: int = 240,
    num_classes: int = 8,
    height: int = 1024,
    width: int = 1280,
    seed: int = 0,
    compounds_per_class: int = 3,
    concentrations: int = 2,
    progress: bool = True,
    camera: Camera = Camera(),
    difficulty: float = 0.0,
) -> Path:
    """Writes a synthetic screen in the BBBC021 layout under ``out`` and returns ``out``; ``difficulty`` in [0, 1]
    makes its classes harder to tell apart (``hard_params``).

    Idempotent: if ``out`` holds a finished screen with the same parameters it returns at once; an interrupted
    run, rerun, renders the remaining images (TIFFs are written atomically) and then the CSVs. The CSVs and a
    marker file are written last, so a screen without them is unfinished.
    """
    out = Path(out)
    if height < 16 or width < 16:
        raise ValueError(f"field size must be at least 16x16, got {height}x{width}")
    params = dict(
        num_images=int(num_images),
        num_classes=int(num_classes),
        height=int(height),
        width=int(width),
        seed=int(seed),
        compounds_per_class=int(compounds_per_class),
        concentrations=int(concentrations),
        version=GENERATOR_VERSION,
    )
    if camera.realistic:  # (the default camera is left out, so screens made before the option stay valid)
        params["camera"] = dataclasses.asdict(camera)
    if difficulty:  # (likewise)
        params["difficulty"] = float(difficulty)
    marker = out / MARKER
    if _recorded(marker, "params") == params:
        return out
    marker.unlink(missing_ok=True)
    sites = layout(num_images, num_classes, seed, compounds_per_class, concentrations)
    out.mkdir(parents=True, exist_ok=True)
    started = out / ".synthetic_started.json"
    # TIFFs already on disk are reused only if they come from an unfinished run with the same parameters
    resume = _recorded(started) == params
    if not resume:
        atomic_write_json(started, params)
    fields = {}
    rows = []
    t0 = time.perf_counter()
    for site in progress_bar(sites, len(sites), "synthetic screen", progress):
        rel, plate_name = _plate_dir(site)
        folder = out / rel
        names = file_names(site, seed)
        rows.append(
            (
                site.plate,
                site.image_number,
                names[0],
                rel,
                names[1],
                rel,
                names[2],
                rel,
                plate_name,
                site.well,
                1,
                site.compound,
                f"{site.concentration:g}",
            )
        )
        if resume and all((folder / n).exists() for n in names):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if site.plate not in fields:
            fields[site.plate] = illumination_field(height, width, [seed, 1_000_003, site.plate])
        img = render_field(
            np.random.default_rng([seed, site.image_number]),
            height,
            width,
            hard_params(
                site.class_index, site.strength, difficulty, np.random.default_rng([seed, site.image_number, 29])
            ),
            fields[site.plate],
            camera,
        )
        for ch, name in enumerate(names):
            _write_tiff(folder / name, img[ch])
    elapsed = time.perf_counter() - t0
    write_csv(out / IMAGE_CSV, IMAGE_COLUMNS, rows)
    names = class_names(num_classes)
    moa = sorted({(s.compound, s.concentration, names[s.class_index]) for s in sites})
    write_csv(out / MOA_CSV, MOA_COLUMNS, [(c, f"{x:f}", m) for c, x, m in moa])
    atomic_write_json(marker, dict(params=params, seconds=round(elapsed, 3), classes=names))
    return out


def prepare_synthetic_store(
    root,
    num_images: int,
    num_classes: int,
    height: int = 1024,
    width: int = 1280,
    seed: int = 0,
    progress: bool = True,
    camera: Camera = Camera(),
    difficulty: float = 0.0,
) -> Path:
    """Generates a synthetic screen under ``root/raw`` and imports it into ``root/store``; returns the store path.

    Idempotent: returns at once if ``root/store`` is a complete store made with the same parameters (a complete
    store made with other parameters is rebuilt). Safe to rerun after an interruption: the screen generation
    and the import both resume. Import options: per-plate 0.1 / 99.9 percentile scaling, per-plate
    illumination correction, uint16; with a realistic ``camera``, no illumination correction (it would undo
    the flat background: the store keeps flat regions, saturated objects and the camera's quantisation).
    """
    root = Path(root)
    store_path = root / "store"
    params = dict(
        num_images=int(num_images), num_classes=int(num_classes), height=int(height), width=int(width), seed=int(seed)
    )
    if camera.realistic:
        params["camera"] = dataclasses.asdict(camera)
    if difficulty:
        params["difficulty"] = float(difficulty)
    rebuild = False
    recorded = dict(params, version=GENERATOR_VERSION)
    if is_complete(store_path):
        try:
            if open_store(store_path).info.get("synthetic") == recorded:
                return store_path
        except StoreError:
            pass
        rebuild = True
    raw = generate_screen(
        root / "raw",
        progress=progress,
        camera=camera,
        difficulty=difficulty,
        **{k: v for k, v in params.items() if k not in ("camera", "difficulty")},
    )
    import_bbbc021(
        raw,
        raw,
        store_path,
        scaling="plate",
        illumination=not camera.realistic,
        dtype="uint16",
        overwrite=rebuild,
        progress=progress,
        extra_info=dict(synthetic=recorded),
    )
    return store_path
