"""Evaluating as the field does: treatment-level accuracy and NSC / NSCB nearest-neighbour MoA matching.

Pure functions on tables (pandas DataFrames) with cytomining column names, so they take any embedding or
prediction table with these columns, not only mcnn-jax's:

- ``Metadata_Compound``, ``Metadata_Concentration``: a **treatment** is one (compound, concentration);
- ``Metadata_MoA``: the mechanism of action (the true class);
- ``Metadata_Plate``: the plate; its **batch** is ``Metadata_Batch`` when the table has one, else the plate
  name's ``WeekN`` prefix (BBBC021: ``Week1_22123`` -> ``Week1``), else the plate itself;
- features: every numeric column whose name does not start with ``Metadata_``;
- predictions: ``Metadata_Predicted_MoA`` and one ``P_<class>`` column of probabilities per class.

``treatment_profiles`` takes the median of every feature over a treatment's rows (images, or the wells of
``well_profiles``). ``nearest_neighbours`` matches every query treatment (controls are never queries) to its
most cosine-similar treatment under

- **NSC** (not-same-compound): the neighbour is a treatment of another compound;
- **NSCB** (not-same-compound-or-batch): another compound, and none of the neighbour's batches is one of the
  query's batches; MoAs whose treatments all lie in one batch are left out, and treatments imaged in every
  batch follow a stated rule (``nscb_plan``: the field's protocol, as published BBBC021 figures are computed),

and the MoA accuracy is the fraction of queries whose neighbour has the query's MoA (Ljosa et al. 2013;
Ando et al. 2017). Normalisations are in ``normalize``, mAP in ``mean_ap``, and ``profile_metrics`` puts
them together (``mcnn-profile-eval FILE``).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mcnn_jax.data._util import atomic_write_bytes, atomic_write_json

COMPOUND, CONCENTRATION, MOA = "Metadata_Compound", "Metadata_Concentration", "Metadata_MoA"
PLATE, WELL, SITE, BATCH = "Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Batch"
INDEX, PREDICTED = "Metadata_StoreIndex", "Metadata_Predicted_MoA"
PROB_PREFIX = "P_"
TREATMENT = [COMPOUND, CONCENTRATION]
CONTROL = "DMSO"


class TableError(ValueError):
    """A table lacks the columns or values an evaluation needs (the message names them and the file)."""


# --- files -------------------------------------------------------------------------------------------------
def read_table(path) -> pd.DataFrame:
    """Reads a Parquet (``.parquet``) or CSV table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no table at {path}")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - a parse error of any kind is a bad file
        raise TableError(f"cannot read the table {path}: {type(e).__name__}: {e}") from e


def write_table(df: pd.DataFrame, path) -> Path:
    """Writes ``df`` as Parquet (``.parquet``) or CSV, atomically (``data._util.atomic_write_bytes``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    if path.suffix == ".parquet":
        df.to_parquet(buf, index=False)
    else:
        df.to_csv(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_json(doc, path) -> Path:
    """Writes ``doc`` as JSON, atomically (``data._util.atomic_write_json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)
    return path


def require_columns(df: pd.DataFrame, columns, what: str, source: str = "the table") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TableError(
            f"{source} lacks the column(s) {', '.join(missing)} needed for {what}; it has: "
            f"{', '.join(map(str, df.columns[:20]))}{' ...' if len(df.columns) > 20 else ''}"
        )


def feature_columns(df: pd.DataFrame, source: str = "the table") -> list[str]:
    """The numeric columns that are not ``Metadata_*`` (the features, as pycytominer counts them)."""
    cols = [
        c
        for c in df.columns
        if not str(c).startswith("Metadata_")
        and not str(c).startswith(PROB_PREFIX)
        and pd.api.types.is_numeric_dtype(df[c])
    ]
    if not cols:
        raise TableError(f"{source} has no feature columns (numeric columns not named Metadata_*)")
    return cols


def batch_of_plate(plate) -> str:
    """BBBC021's batch: the ``WeekN`` prefix of a plate name (``Week1_22123`` -> ``Week1``), else the plate."""
    m = re.match(r"(Week\d+)[_-]", str(plate))
    return m.group(1) if m else str(plate)


def batches(df: pd.DataFrame) -> pd.Series:
    if BATCH in df.columns:
        return df[BATCH].astype(str)
    if PLATE in df.columns:
        return df[PLATE].map(batch_of_plate)
    raise TableError(f"NSCB needs a batch: the table has neither {BATCH} nor {PLATE}")


# --- profiles ----------------------------------------------------------------------------------------------
def well_profiles(df: pd.DataFrame, features=None, source: str = "the table") -> pd.DataFrame:
    """One row per well (plate, well): the mean of every feature over the well's rows (its sites), with the
    well's compound, concentration and MoA (and batch, if the table has one); ``Metadata_Images`` counts them."""
    require_columns(df, [PLATE, WELL, COMPOUND, CONCENTRATION, MOA], "well-level profiles", source)
    features = list(features) if features is not None else feature_columns(df, source)
    keys = [PLATE, WELL]
    meta = [c for c in (COMPOUND, CONCENTRATION, MOA, BATCH) if c in df.columns]
    mixed = df.groupby(keys)[[COMPOUND, CONCENTRATION]].nunique().max(axis=1)
    if (mixed > 1).any():
        bad = mixed[mixed > 1].index[0]
        raise TableError(f"{source}: well {bad} holds more than one treatment ({COMPOUND}, {CONCENTRATION})")
    g = df.groupby(keys, sort=True)
    prof = g[features].mean()
    for c in reversed(meta):
        prof.insert(0, c, g[c].first())
    prof.insert(len(meta), "Metadata_Images", g.size())
    return prof.reset_index()


def treatment_profiles(df: pd.DataFrame, features=None, source: str = "the table") -> pd.DataFrame:
    """One row per treatment: compound, concentration, MoA, the batches it was imaged in (sorted, joined by
    ``;``), its number of rows and the median of every feature over them (its images, or its wells)."""
    require_columns(df, [COMPOUND, CONCENTRATION, MOA], "treatment profiles", source)
    features = list(features) if features is not None else feature_columns(df, source)
    df = df.assign(_batch=batches(df) if (BATCH in df.columns or PLATE in df.columns) else "")
    moas = df.groupby(TREATMENT)[MOA].nunique()
    if (moas > 1).any():
        bad = moas[moas > 1].index[0]
        raise TableError(f"{source}: treatment {bad} has more than one {MOA}")
    g = df.groupby(TREATMENT, sort=True)
    prof = g[features].median()
    prof.insert(0, "Metadata_Images", g.size())
    prof.insert(0, "Metadata_Batches", g["_batch"].agg(lambda b: ";".join(sorted(set(map(str, b))))))
    prof.insert(0, MOA, g[MOA].first())
    return prof.reset_index()


def _cosine(a: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return a @ a.T


# --- NSCB: which treatments take part --------------------------------------------------------------------------
NSCB_RULES = ("field", "strict")


def batch_sets(profiles: pd.DataFrame) -> list[set]:
    return [set(str(b).split(";")) for b in profiles["Metadata_Batches"]]


def nscb_plan(profiles: pd.DataFrame, control: str = CONTROL, rule: str = "field") -> dict:
    """Which treatments NSCB leaves out, and why, under the field's protocol (DeepProfiler's BBBC021 ``nscb``):

    - ``left_out_moas`` {MoA: reason}: an MoA whose treatments all lie in one batch cannot have a correct
      neighbour of another compound in another batch, so it is left out of NSCB, as queries and as
      neighbours (BBBC021: Cholesterol-lowering, all in Week9, and Kinase inhibitors, all in Week7: NSCB is
      then over 92 of the 103 treatments);
    - ``every_batch`` [(compound, concentration)]: treatments imaged in every batch of the screen (BBBC021's
      taxol @ 0.3, a control on every plate) have no neighbour in another batch. Rule ``field`` (default)
      waives the batch condition for them, as and against them, so they stay in (the reference code compares
      a treatment's whole list of batches, which is unique to such a treatment); rule ``strict`` leaves them
      out (queries and neighbours), which makes NSCB over 91 on BBBC021, and an MoA whose other treatments
      all lie in one batch is then left out too.

    Also, over the rows of ``profiles``: ``taking_part`` (the treatments NSCB matches, as queries and
    neighbours), ``every`` (the every-batch treatments) and ``shares_batch`` [T, T] (two treatments share a
    batch).
    """
    if rule not in NSCB_RULES:
        raise ValueError(f"the NSCB rule must be one of {', '.join(NSCB_RULES)}, got {rule!r}")
    if (profiles["Metadata_Batches"].astype(str) == "").any():
        raise TableError(f"NSCB needs a batch: the table has neither {BATCH} nor {PLATE}")
    treated = (profiles[COMPOUND] != control).to_numpy()
    sets = batch_sets(profiles)
    screen = sorted(set().union(*sets)) if sets else []
    member = np.array([[b in s for b in screen] for s in sets], dtype=np.float64).reshape(len(sets), len(screen))
    every = treated & (len(screen) > 1) & (member.sum(1) == len(screen))
    taking_part = treated & ~every if rule == "strict" else treated.copy()
    left_out = {}
    for moa, rows in profiles[taking_part].groupby(MOA).indices.items():
        rows = np.flatnonzero(taking_part)[rows]
        moa_batches = set().union(*(sets[i] for i in rows))
        if len(moa_batches) == 1:
            left_out[str(moa)] = (
                f"its {len(rows)} treatment(s) all lie in batch {next(iter(moa_batches))}: no "
                f"treatment of another compound in another batch shares its MoA"
            )
    taking_part &= ~profiles[MOA].astype(str).isin(list(left_out)).to_numpy()
    return dict(
        rule=rule,
        left_out_moas=left_out,
        every_batch=[
            (str(profiles[COMPOUND].iat[i]), float(profiles[CONCENTRATION].iat[i])) for i in np.flatnonzero(every)
        ],
        taking_part=taking_part,
        every=every,
        shares_batch=member @ member.T > 0,
    )


PLAN_MASKS = ("taking_part", "every", "shares_batch")  # nscb_plan's arrays (not part of a JSON report)


def nearest_neighbours(
    profiles: pd.DataFrame,
    features=None,
    mode: str = "nsc",
    control: str = CONTROL,
    queries=None,
    rule: str = "field",
    plan: dict | None = None,
) -> pd.DataFrame:
    """For every query treatment, its most cosine-similar allowed treatment (see the module docstring and
    ``nscb_plan`` for what NSCB leaves out and ``rule``; ``plan``: ``nscb_plan``'s result, if already made).

    ``queries``: a boolean mask over ``profiles`` (default: every non-control treatment). Controls are never
    queries nor neighbours. Returns one row per query: compound, concentration, MoA, the neighbour's compound,
    concentration and MoA, the similarity and ``correct``; a query with no allowed neighbour gets NaN there.
    """
    if mode not in ("nsc", "nscb"):
        raise ValueError(f"mode must be 'nsc' or 'nscb', got {mode!r}")
    features = list(features) if features is not None else feature_columns(profiles)
    treated = (profiles[COMPOUND] != control).to_numpy()
    comp = profiles[COMPOUND].to_numpy()
    allowed = treated[None, :] & (comp[None, :] != comp[:, None])
    taking_part = treated.copy()
    if mode == "nscb":
        plan = plan or nscb_plan(profiles, control, rule)
        taking_part, every = plan["taking_part"], plan["every"]
        # another batch, except that the batch condition is waived for a treatment imaged in every batch (the
        # field rule; under the strict rule such a treatment is not taking part)
        allowed &= ~plan["shares_batch"] | every[None, :] | every[:, None]
        allowed &= taking_part[None, :]
    q = taking_part if queries is None else taking_part & np.asarray(queries, bool)
    x = profiles[features].to_numpy(np.float64)
    bad = [f for f, ok in zip(features, np.isfinite(x).all(0)) if not ok]
    if bad:
        raise TableError(
            f"the treatment profiles have missing or infinite values in {len(bad)} feature(s): "
            f"{', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''} (drop those columns, e.g. "
            f"pycytominer's feature_select drop_na_columns)"
        )
    sim = _cosine(x)
    rows = []
    for i in np.flatnonzero(q):
        row = {COMPOUND: comp[i], CONCENTRATION: profiles[CONCENTRATION].iat[i], MOA: profiles[MOA].iat[i]}
        cand = np.flatnonzero(allowed[i])
        if len(cand):
            j = cand[np.argmax(sim[i, cand])]
            row.update(
                neighbour_compound=comp[j],
                neighbour_concentration=profiles[CONCENTRATION].iat[j],
                neighbour_moa=profiles[MOA].iat[j],
                similarity=float(sim[i, j]),
                correct=bool(profiles[MOA].iat[j] == row[MOA]),
            )
        else:
            row.update(
                neighbour_compound=None,
                neighbour_concentration=np.nan,
                neighbour_moa=None,
                similarity=np.nan,
                correct=np.nan,
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=MATCH_COLUMNS)


MATCH_COLUMNS = [
    COMPOUND,
    CONCENTRATION,
    MOA,
    "neighbour_compound",
    "neighbour_concentration",
    "neighbour_moa",
    "similarity",
    "correct",
]


def nn_accuracy(matches: pd.DataFrame) -> dict:
    """Accuracy over the queries that have a neighbour, with the counts."""
    has = matches["correct"].notna()
    n = int(has.sum())
    return dict(
        accuracy=float(matches.loc[has, "correct"].astype(bool).mean()) if n else None,
        treatments=n,
        without_neighbour=int((~has).sum()),
    )


# --- predictions: treatment and compound level ---------------------------------------------------------------
def probability_columns(df: pd.DataFrame, source: str = "the table") -> list[str]:
    cols = [c for c in df.columns if str(c).startswith(PROB_PREFIX)]
    if not cols:
        raise TableError(f"{source} has no class probability columns ({PROB_PREFIX}<class>)")
    return cols


def treatment_predictions(df: pd.DataFrame, source: str = "the table") -> pd.DataFrame:
    """One row per treatment: its MoA, the class with the highest mean probability over its images, the
    number of images and ``correct``."""
    require_columns(df, [COMPOUND, CONCENTRATION, MOA], "treatment-level accuracy", source)
    probs = probability_columns(df, source)
    g = df.groupby(TREATMENT, sort=True)
    mean = g[probs].mean()
    out = pd.DataFrame(
        {
            MOA: g[MOA].first(),
            "Metadata_Images": g.size(),
            PREDICTED: [p[len(PROB_PREFIX) :] for p in mean.idxmax(axis=1)],
        }
    )
    out["correct"] = out[MOA].astype(str) == out[PREDICTED].astype(str)
    return out.reset_index()


def compound_summary(df: pd.DataFrame, source: str = "the table") -> pd.DataFrame:
    """Per compound: MoA, images, image accuracy, treatments and treatment-level accuracy."""
    require_columns(df, [COMPOUND, MOA, PREDICTED], "per-compound accuracy", source)
    tr = treatment_predictions(df, source)
    img = df.assign(_ok=df[MOA].astype(str) == df[PREDICTED].astype(str)).groupby(COMPOUND)
    out = pd.DataFrame({MOA: img[MOA].first(), "images": img.size(), "image_accuracy": img["_ok"].mean()})
    t = tr.groupby(COMPOUND)
    out["treatments"] = t.size()
    out["treatment_accuracy"] = t["correct"].mean()
    return out.reset_index()


def treatment_accuracy(probs, labels, compounds, concentrations, control: str = CONTROL) -> dict:
    """Treatment-level accuracy from arrays (for a training loop's evaluation): the class with the highest mean
    probability over each (compound, concentration)'s images against its label; the control is left out."""
    df = pd.DataFrame(
        {
            COMPOUND: np.asarray(compounds, dtype=object),
            CONCENTRATION: np.asarray(concentrations),
            MOA: np.asarray(labels).astype(str),
        }
    )
    probs = np.asarray(probs)
    df = pd.concat([df, pd.DataFrame(probs, columns=[f"{PROB_PREFIX}{k}" for k in range(probs.shape[1])])], axis=1)
    tr = treatment_predictions(df[df[COMPOUND] != control])
    return dict(treatment_accuracy=float(tr["correct"].mean()) if len(tr) else None, treatments=len(tr))


def prediction_summary(df: pd.DataFrame, control: str = CONTROL, source: str = "the table") -> dict:
    """Image, treatment-level (control excluded) and per-compound accuracy of a predictions table."""
    require_columns(df, [MOA, PREDICTED], "accuracy", source)
    tr = treatment_predictions(df, source)
    tr = tr[tr[COMPOUND] != control]
    comp = compound_summary(df, source)
    return dict(
        images=len(df),
        image_accuracy=float((df[MOA].astype(str) == df[PREDICTED].astype(str)).mean()),
        treatments=len(tr),
        treatment_accuracy=float(tr["correct"].mean()) if len(tr) else None,
        per_compound=comp,
        per_treatment=tr,
    )
