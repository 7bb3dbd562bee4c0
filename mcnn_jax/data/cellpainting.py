"""A synthetic Cell-Painting-like screen: five stains, one TIFF per channel, and a manifest table.

``generate_cellpainting_screen(out, ...)`` uses the synthetic screen's layout and phenotypes
(``mcnn_jax.data.synthetic``: classes, compounds, concentrations, plates, wells, 4 sites per well) but renders
the five Cell Painting channels, each with its own structure:

- ``DNA``: nuclei with chromatin texture (Hoechst);
- ``ER``: a reticular texture filling the cytoplasm, densest around the nucleus (concanavalin A);
- ``RNA``: two or three nucleoli per nucleus and a faint cytoplasm (SYTO 14);
- ``AGP``: the cell cortex (actin), a Golgi blob beside the nucleus and puncta (phalloidin, WGA);
- ``Mito``: many small mitochondria spread over the cytoplasm (MitoTracker).

It writes ``images/<plate>/<well>_s<site>_<channel>.tif`` (single-channel uint16) and ``manifest.csv`` with
``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``, ``Metadata_Compound``, ``Metadata_Concentration``,
``Metadata_MoA`` and one path column per channel, for ``mcnn-data manifest --label Metadata_MoA``.
Deterministic by seed, resumable, and finished only once the table and a marker are written (last).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mcnn_jax.data._util import atomic_write_json, write_csv
from mcnn_jax.data._util import progress as progress_bar
from mcnn_jax.data.synthetic import (
    GENERATOR_VERSION,
    _bandpass_noise,
    _ellipses,
    _gaussians,
    _write_tiff,
    class_names,
    illumination_field,
    layout,
    phenotype_params,
)

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
INDEX = "manifest.csv"
MARKER = ".cellpainting_complete.json"
STARTED = ".cellpainting_started.json"
META_COLUMNS = (
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_Compound",
    "Metadata_Concentration",
    "Metadata_MoA",
)


def _cells(rng, h: int, w: int, p: dict) -> dict:
    """Cell centres, shapes and nuclei (one or several per cell) of one field."""
    n = max(1, int(round(p["density"] * h * w * rng.uniform(0.9, 1.1))))
    pos = rng.uniform(0, 1, (n, 2)) * (h, w)
    m = int(round(p["cluster"] * n))
    if m:
        k = max(1, m // 25)
        centre = rng.uniform(0.15, 0.85, (k, 2)) * (h, w)
        spread = 0.64 * p["rc"] * math.sqrt(max(m / k, 1.0))
        pos[:m] = np.clip(centre[rng.integers(0, k, m)] + rng.normal(0, spread, (m, 2)), 0, (h - 1, w - 1))
    theta = rng.uniform(0, np.pi, n)
    rc, rn = p["rc"] * rng.uniform(0.85, 1.15, n), p["rn"] * rng.uniform(0.85, 1.15, n)
    count = np.where(rng.random(n) < p["p_multi"], rng.integers(2, 4, n), 1)
    owner = np.repeat(np.arange(n), count)
    shift = np.concatenate([np.arange(c) - (c - 1) / 2 for c in count]) * 1.3 * rn[owner]
    small = np.where(count[owner] > 1, 0.75, 1.0)
    nuc = pos[owner] + shift[:, None] * np.stack([np.sin(theta[owner]), np.cos(theta[owner])], 1)
    return dict(
        n=n,
        pos=pos,
        theta=theta,
        a=rc * math.sqrt(p["aspect_c"]),
        b=rc / math.sqrt(p["aspect_c"]),
        owner=owner,
        nuc=nuc,
        na=rn[owner] * small * math.sqrt(p["aspect_n"]),
        nb=rn[owner] * small / math.sqrt(p["aspect_n"]),
    )


def _spots(rng, c: dict, per_cell, reach: float, h: int, w: int, sigma: float, amp) -> np.ndarray:
    """Gaussian spots scattered inside each cell's ellipse out to ``reach`` of its radius."""
    owner = np.repeat(np.arange(c["n"]), per_cell)
    r, phi = np.sqrt(rng.random(len(owner))) * reach, rng.uniform(0, 2 * np.pi, len(owner))
    u, v = r * np.cos(phi) * c["a"][owner], r * np.sin(phi) * c["b"][owner]
    co, si = np.cos(c["theta"][owner]), np.sin(c["theta"][owner])
    y, x = c["pos"][owner, 0] + u * si + v * co, c["pos"][owner, 1] + u * co - v * si
    return _gaussians(h, w, y, x, sigma, rng.uniform(0.7, 1.3, len(owner)) * amp)


def render_cellpainting(rng: np.random.Generator, h: int, w: int, params: dict, illumination=None) -> np.ndarray:
    """Renders one five-channel field (DNA, ER, RNA, AGP, Mito) as uint16 [5, h, w]."""
    p, c = params, _cells(rng, h, w, params)
    ny, nx = c["nuc"][:, 0], c["nuc"][:, 1]
    th = c["theta"][c["owner"]]
    nucleus = _ellipses(h, w, ny, nx, c["na"], c["nb"], th, np.ones(len(ny)))
    dna = 1400.0 * p["dapi"] * nucleus * (1.0 + 0.15 * _bandpass_noise(rng, h, w, 0.2))
    inside = np.minimum(nucleus, 1.0)
    body = np.minimum(_ellipses(h, w, *c["pos"].T, c["a"], c["b"], c["theta"], np.ones(c["n"])), 1.3)
    near = _ellipses(h, w, *c["pos"].T, 0.6 * c["a"], 0.6 * c["b"], c["theta"], np.ones(c["n"]), edge=4.0)
    mesh = np.maximum(1.0 + (0.4 + p["tex_contrast"]) * _bandpass_noise(rng, h, w, p["tex_freq"] + 0.05), 0.0)
    er = 700.0 * (0.4 * body + 0.8 * near) * mesh * (1.0 - 0.8 * inside)
    k = rng.integers(2, 4, len(ny))
    which = np.repeat(np.arange(len(ny)), k)
    off = rng.normal(0, 0.35, (len(which), 2)) * np.stack([c["na"][which], c["nb"][which]], 1)
    rna = 250.0 * body * (1.0 - inside) + _gaussians(
        h, w, ny[which] + off[:, 0], nx[which] + off[:, 1], 1.5, np.full(len(which), 1800.0)
    )
    ring = np.clip(
        body
        - _ellipses(
            h, w, *c["pos"].T, np.maximum(c["a"] - 3, 1), np.maximum(c["b"] - 3, 1), c["theta"], np.ones(c["n"])
        ),
        0,
        None,
    )
    golgi = _gaussians(
        h,
        w,
        c["pos"][:, 0] + 1.3 * p["rn"] * np.sin(c["theta"]),
        c["pos"][:, 1] + 1.3 * p["rn"] * np.cos(c["theta"]),
        2.5,
        np.full(c["n"], 1500.0),
    )
    agp = 200.0 * body + 900.0 * ring + golgi + _spots(rng, c, rng.poisson(p["puncta"], c["n"]), 0.8, h, w, 1.0, 2000.0)
    mito = 150.0 * body * (1.0 - inside) + _spots(rng, c, rng.poisson(40 * p["rc"] / 15, c["n"]), 0.9, h, w, 0.8, 700.0)
    img = np.stack([dna, er, rna, agp, mito]).astype(np.float32)
    img *= rng.uniform(0.9, 1.1, (5, 1, 1)).astype(np.float32)
    if illumination is not None:
        img *= illumination[None]
    img += 110.0
    img += np.sqrt(img * 0.6) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img + 6.0 * rng.standard_normal(img.shape, dtype=np.float32), 0, 65535).astype(np.uint16)


def generate_cellpainting_screen(
    out,
    num_images: int = 240,
    num_classes: int = 8,
    height: int = 1080,
    width: int = 1080,
    seed: int = 0,
    compounds_per_class: int = 3,
    concentrations: int = 2,
    progress: bool = True,
) -> Path:
    """Writes the five-channel screen and its ``manifest.csv`` under ``out``; returns the table's path.

    Idempotent (a finished screen with the same parameters is reused) and resumable (TIFFs are written
    atomically; an unfinished screen with the same parameters keeps the ones on disk).
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
        channels=list(CHANNELS),
    )
    try:
        if json.loads((out / MARKER).read_text()) == params and (out / INDEX).is_file():
            return out / INDEX
    except (OSError, ValueError):
        pass
    sites = layout(num_images, num_classes, seed, compounds_per_class, concentrations)
    names, rows, fields = class_names(num_classes), [], {}
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    try:  # TIFFs on disk are reused only if an unfinished run with the same parameters wrote them
        resume = json.loads((out / STARTED).read_text()) == params
    except (OSError, ValueError):
        resume = False
    atomic_write_json(out / STARTED, params)
    for s in progress_bar(sites, len(sites), "synthetic Cell Painting screen", progress):
        plate = f"Plate{s.plate}"
        rel = [f"images/{plate}/{s.well}_s{s.site}_{ch}.tif" for ch in CHANNELS]
        rows.append((plate, s.well, s.site, s.compound, f"{s.concentration:g}", names[s.class_index], *rel))
        if resume and all((out / r).is_file() for r in rel):  # TIFFs are written atomically
            continue
        if s.plate not in fields:
            fields[s.plate] = illumination_field(height, width, [seed, 1_000_003, s.plate])
        img = render_cellpainting(
            np.random.default_rng([seed, s.image_number, 5]),
            height,
            width,
            phenotype_params(s.class_index, s.strength),
            fields[s.plate],
        )
        (out / rel[0]).parent.mkdir(parents=True, exist_ok=True)
        for plane, r in zip(img, rel):
            _write_tiff(out / r, plane)
    write_csv(out / INDEX, (*META_COLUMNS, *CHANNELS), rows)
    atomic_write_json(out / MARKER, params)
    return out / INDEX
