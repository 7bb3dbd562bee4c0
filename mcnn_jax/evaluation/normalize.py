"""Normalising image-level profiles against the controls before they are aggregated, as published BBBC021
evaluations do. Each step takes and returns a table (features replaced, ``Metadata_*`` kept) and is fitted on
the control (DMSO) rows only:

- ``plate``: per-plate standardisation, ``(x - mean) / std`` of the plate's control rows, feature by feature;
- ``tvn``: typical variation normalisation (Ando et al. 2017): whitening fitted on all control rows, ``(x -
  mu) W`` with ``W = (C + reg I)^(-1/2)`` and ``C`` the controls' covariance. This is the symmetric (ZCA)
  form; DeepProfiler's BBBC021 notebook uses ``V (S + reg I)^(-1/2)`` (the same up to the rotation ``V^T``,
  so every cosine similarity, and so NSC, NSCB and mAP, are the same);
- ``coral``: CORAL per batch (Sun et al. 2016, as in DeepProfiler's BBBC021 evaluation): every batch's rows are
  mapped by ``(C_b + reg I)^(-1/2) (C + reg I)^(1/2)``, with ``C_b`` the second moment (``X^T X / n``) of that
  batch's control rows and ``C`` that of all control rows, so each batch's controls take the shape of all of
  them.

``reg`` is DeepProfiler's ``REG_PARAM`` (1.0 there, and here by default): it keeps directions in which the
controls barely vary from being blown up. Steps run in the order given, e.g. ``("tvn", "coral")`` as in
DeepProfiler. In float64 throughout.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mcnn_jax.evaluation.profiles import COMPOUND, CONTROL, PLATE, TableError, batches, require_columns

STEPS = ("plate", "tvn", "coral")


def parse_steps(spec) -> tuple[str, ...]:
    """``"tvn,coral"`` (or a sequence, or True for ``("plate",)``, False/None/"" for none) -> validated steps."""
    if spec is True:
        return ("plate",)
    if not spec:
        return ()
    steps = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip())
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise ValueError(
            f"unknown normalisation step(s) {', '.join(map(repr, bad))}; choose from {', '.join(STEPS)} "
            f"(comma-separated, applied in order, e.g. tvn,coral)"
        )
    return steps


def _control_rows(df: pd.DataFrame, control: str, source: str, what: str) -> np.ndarray:
    require_columns(df, [COMPOUND], what, source)
    is_ctrl = (df[COMPOUND] == control).to_numpy()
    if is_ctrl.sum() < 2:
        raise TableError(
            f"{source}: {what} is fitted on the {control} (control) rows, and the table has {int(is_ctrl.sum())}"
        )
    return is_ctrl


def _sym_power(c: np.ndarray, power: float) -> np.ndarray:
    """``c ** power`` of a symmetric positive definite matrix, through its eigendecomposition."""
    s, v = np.linalg.eigh(c)
    return (v * s**power) @ v.T


def standardize_per_plate(df: pd.DataFrame, features, control: str = CONTROL, source="the table") -> pd.DataFrame:
    """Standardises every feature per plate against the plate's control rows: (x - mean) / std."""
    require_columns(df, [PLATE, COMPOUND], "per-plate normalisation", source)
    out = df.copy()
    x = df[features].to_numpy(np.float64, copy=True)  # written in place below (read-only under copy-on-write)
    is_ctrl = (df[COMPOUND] == control).to_numpy()
    for plate, rows in df.groupby(PLATE).indices.items():
        ctrl = rows[is_ctrl[rows]]
        if len(ctrl) == 0:
            raise TableError(f"{source}: plate {plate!r} has no {control} (control) images to normalise against")
        mu, sd = x[ctrl].mean(0), x[ctrl].std(0)
        x[rows] = (x[rows] - mu) / np.where(sd > 1e-12, sd, 1.0)
    out[features] = x
    return out


def tvn(df: pd.DataFrame, features, control: str = CONTROL, reg: float = 1.0, source="the table") -> pd.DataFrame:
    """Typical variation normalisation: ``(x - mu) (C + reg I)^(-1/2)``, ``mu`` and ``C`` (``X^T X / n`` of the
    centred rows) from the control rows."""
    is_ctrl = _control_rows(df, control, source, "TVN")
    x = df[features].to_numpy(np.float64)
    mu = x[is_ctrl].mean(0)
    xc = x[is_ctrl] - mu
    w = _sym_power(xc.T @ xc / len(xc) + reg * np.eye(x.shape[1]), -0.5)
    out = df.copy()
    out[features] = (x - mu) @ w
    return out


def coral(df: pd.DataFrame, features, control: str = CONTROL, reg: float = 1.0, source="the table") -> pd.DataFrame:
    """CORAL per batch: each batch's rows times ``(C_b + reg I)^(-1/2) (C + reg I)^(1/2)`` (second moments of
    the batch's and of all control rows; the batch as ``profiles.batches``)."""
    is_ctrl = _control_rows(df, control, source, "CORAL")
    x = df[features].to_numpy(np.float64)
    eye = reg * np.eye(x.shape[1])
    xt = x[is_ctrl]
    target = _sym_power(xt.T @ xt / len(xt) + eye, 0.5)
    out_x = np.empty_like(x)
    batch_of = batches(df).to_numpy()
    for batch in np.unique(batch_of):
        rows = np.flatnonzero(batch_of == batch)
        xb = x[rows[is_ctrl[rows]]]
        if len(xb) == 0:
            raise TableError(f"{source}: batch {batch!r} has no {control} (control) rows to align (CORAL)")
        out_x[rows] = x[rows] @ _sym_power(xb.T @ xb / len(xb) + eye, -0.5) @ target
    out = df.copy()
    out[features] = out_x
    return out


def normalize(
    df: pd.DataFrame, features, steps, control: str = CONTROL, reg: float = 1.0, source="the table"
) -> pd.DataFrame:
    """Applies ``steps`` (see ``parse_steps``) in order."""
    for step in parse_steps(steps):
        if step == "plate":
            df = standardize_per_plate(df, features, control, source)
        elif step == "tvn":
            df = tvn(df, features, control, reg, source)
        else:
            df = coral(df, features, control, reg, source)
    return df
