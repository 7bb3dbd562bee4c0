"""Mean average precision (mAP), the field's current profiling metric (Kalinin et al. 2025), through ``copairs``.

Every query profile's average precision (AP) ranks all its candidate profiles by cosine similarity, with
positives and negatives chosen by metadata (``copairs.map.average_precision``); a group's mAP is the mean AP
of its queries, and its p-value comes from a null of random rankings of the same sizes, corrected for
multiple testing by Benjamini-Hochberg (``copairs.map.mean_average_precision``).

- **Phenotypic activity** (``activity_ap``): can a treatment's replicate profiles (its images, or its wells)
  be told from the controls? Query: a treated row; positives: the other rows of its treatment (compound,
  concentration); negatives: the control rows. A treatment is *active* when its mAP's corrected p-value is
  below the threshold (0.05); a compound is *retrieved* when one of its treatments is active.
- **MoA consistency** (``consistency_ap``), on treatment profiles (controls left out): does a treatment rank
  the treatments of its MoA first? ``nsc``: positives of the same MoA and another compound, negatives of
  other MoAs; ``nscb``, the mAP form of NSCB: positives also from another batch, negatives from another batch
  too, with the treatments and MoAs NSCB leaves out (``profiles.nscb_plan``) left out here as well. Batches
  are compared as the treatment's list of batches (``Metadata_Batches``): that is NSCB's "no shared batch"
  where every treatment is in one batch, or in all of them under the field rule.

``summarize`` turns a table of APs (one fold's, or several folds' pooled) into the reported figures.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd

from mcnn_jax.evaluation.profiles import COMPOUND, CONCENTRATION, CONTROL, MOA, batch_sets, nscb_plan

AP_COLUMNS = [
    COMPOUND,
    CONCENTRATION,
    MOA,
    "average_precision",
    "normalized_average_precision",
    "n_pos_pairs",
    "n_total_pairs",
]
AP_DTYPES = [object, np.float64, object, np.float64, np.float64, np.int64, np.int64]
_TREATMENT, _BATCH, _REF = "Metadata_Treatment", "Metadata_BatchKey", "Metadata_Reference_Index"


def _copairs_ap(meta: pd.DataFrame, feats: np.ndarray, **pairs) -> pd.DataFrame:
    """``copairs.map.average_precision`` without its progress bar and log chatter; queries without a positive
    or a negative pair get no AP (left out, as copairs does)."""
    from copairs.map import average_precision
    from copairs.matching import UnpairedException

    logging.getLogger("copairs").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ap = average_precision(
                meta.reset_index(drop=True),
                np.ascontiguousarray(feats, np.float64),
                batch_size=20000,
                distance="cosine",
                progress_bar=False,
                **pairs,
            )
    except UnpairedException:
        return empty_ap()
    return ap[ap["average_precision"].notna()]


def empty_ap() -> pd.DataFrame:
    """An AP table without rows, with the column types of a full one (so that tables pool with ``pd.concat``)."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(AP_COLUMNS, AP_DTYPES)})


def _treatment_key(df: pd.DataFrame) -> pd.Series:
    return df[COMPOUND].astype(str) + " @ " + df[CONCENTRATION].astype(str)


def activity_ap(rows: pd.DataFrame, features, control: str = CONTROL, query_compounds=None) -> pd.DataFrame:
    """The AP of every treated row (of ``query_compounds``, default all) retrieving its treatment's other rows
    against the control rows (copairs' reference-index recipe: controls never pair with each other)."""
    keep = rows[COMPOUND] == control
    keep |= rows[COMPOUND].isin(list(query_compounds)) if query_compounds is not None else rows[COMPOUND] != control
    rows = rows[keep].reset_index(drop=True)
    meta = rows[[COMPOUND, CONCENTRATION, MOA]].assign(**{_TREATMENT: _treatment_key(rows)})
    meta[_REF] = np.where(rows[COMPOUND] == control, np.arange(len(rows)), -1)
    ap = _copairs_ap(
        meta,
        rows[list(features)].to_numpy(np.float64),
        pos_sameby=[_TREATMENT, _REF],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=[_TREATMENT, _REF],
    )
    return ap.loc[ap[COMPOUND] != control, AP_COLUMNS].reset_index(drop=True)


def consistency_ap(
    profiles: pd.DataFrame,
    features,
    mode: str = "nsc",
    control: str = CONTROL,
    rule: str = "field",
    query_compounds=None,
    plan: dict | None = None,
) -> pd.DataFrame:
    """The AP of every treatment profile (of ``query_compounds``) retrieving its MoA's treatments of other
    compounds (``nscb``: and batches) against other MoAs' (``nscb``: of other batches); ``nscb`` takes part as
    ``profiles.nscb_plan`` (``plan``, if already made) says."""
    if mode not in ("nsc", "nscb"):
        raise ValueError(f"mode must be 'nsc' or 'nscb', got {mode!r}")
    keep = (profiles[COMPOUND] != control).to_numpy()
    meta = profiles[[COMPOUND, CONCENTRATION, MOA]].assign(**{_BATCH: profiles["Metadata_Batches"].astype(str)})
    pos_diffby, neg_diffby = [COMPOUND], [MOA]
    if mode == "nscb":
        plan = plan or nscb_plan(profiles, control, rule)
        keep = plan["taking_part"]
        # a treatment in every batch (kept by the field rule) gets a batch key of its own: it shares a batch with
        # no one, as NSCB's rule waives the batch condition for it
        every = plan["every"]
        meta.loc[every, _BATCH] = "every batch: " + _treatment_key(profiles[every])
        pos_diffby, neg_diffby = [COMPOUND, _BATCH], [MOA, _BATCH]
    prof, meta = profiles[keep], meta[keep]
    if query_compounds is not None and not prof[COMPOUND].isin(list(query_compounds)).any():
        return empty_ap()
    ap = _copairs_ap(
        meta,
        prof[list(features)].to_numpy(np.float64),
        pos_sameby=[MOA],
        pos_diffby=pos_diffby,
        neg_sameby=[],
        neg_diffby=neg_diffby,
    )
    if query_compounds is not None:
        ap = ap[ap[COMPOUND].isin(list(query_compounds))]
    return ap[AP_COLUMNS].reset_index(drop=True)


def partly_shared_batches(profiles: pd.DataFrame, control: str = CONTROL) -> list[str]:
    """Treatments imaged in more than one batch but not in all: there the mAP form of NSCB (batch lists
    compared as labels) and NSCB (batch sets must be disjoint) differ."""
    treated = profiles[profiles[COMPOUND] != control]
    sets = batch_sets(treated)
    screen = set().union(*batch_sets(profiles)) if len(profiles) else set()
    return [
        f"{c} @ {x:g}"
        for (c, x), s in zip(zip(treated[COMPOUND], treated[CONCENTRATION]), sets)
        if 1 < len(s) < len(screen)
    ]


def summarize(ap: pd.DataFrame, sameby: str, null_size: int = 10000, threshold: float = 0.05, seed: int = 0) -> dict:
    """``mean_ap`` (the mean AP over all queries), ``queries``, and per group of ``sameby`` (``treatment``, or
    ``Metadata_MoA``): its mAP, p-value and corrected p-value (copairs' null of ``null_size`` rankings),
    ``significant`` (corrected p < ``threshold``) and the fraction of groups significant."""
    out = dict(
        mean_ap=float(ap["average_precision"].mean()) if len(ap) else None,
        queries=len(ap),
        threshold=threshold,
        null_size=null_size,
    )
    if not len(ap):
        return dict(out, groups=0, fraction_significant=None, per_group=[])
    from copairs.map import mean_average_precision

    ap = ap.astype({"n_pos_pairs": np.int64, "n_total_pairs": np.int64})
    ap = ap.assign(**{_TREATMENT: _treatment_key(ap)})
    key = _TREATMENT if sameby == "treatment" else sameby
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = mean_average_precision(ap, [key], null_size=null_size, threshold=threshold, seed=seed, progress_bar=False)
    per_group = [
        dict(
            group=str(r[key]),
            mean_average_precision=float(r["mean_average_precision"]),
            p_value=float(r["p_value"]),
            corrected_p_value=float(r["corrected_p_value"]),
            significant=bool(r["below_corrected_p"]),
        )
        for _, r in m.iterrows()
    ]
    out.update(
        groups=len(per_group),
        fraction_significant=float(np.mean([g["significant"] for g in per_group])),
        per_group=per_group,
    )
    if sameby == "treatment":
        active = {ap.loc[ap[_TREATMENT] == g["group"], COMPOUND].iat[0] for g in per_group if g["significant"]}
        compounds = sorted(set(ap[COMPOUND]))
        out.update(
            compounds=len(compounds),
            compounds_retrieved=len(active),
            fraction_compounds_retrieved=len(active) / len(compounds),
        )
    return out
