"""``mcnn-profile-eval``: the profiling figures the field reports, on any image-level (or well-level) table.

    mcnn-profile-eval emb.parquet [--normalize tvn,coral] [--level well] [--nscb-rule field|strict] [--json F]

From a table with the cytomining columns (``profiles``' docstring), in this order:

1. **normalise** the rows against the controls (``normalize``: ``plate``, ``tvn``, ``coral``, in the order
   given; none by default);
2. **aggregate**: ``--level image`` (default) takes the rows as they are, ``--level well`` first averages each
   well's sites (``profiles.well_profiles``); treatment profiles are then the median over a treatment's rows;
3. **NSC / NSCB** 1-nearest-neighbour MoA accuracy over treatments (NSCB by the field's protocol:
   ``profiles.nscb_plan`` says what it leaves out and why);
4. **mAP** through copairs (``mean_ap``): phenotypic activity against the controls (per treatment, on
   the rows of step 2) and MoA consistency (``nsc`` and ``nscb`` forms, on treatment profiles).

In Python: ``profile_report(table, ProfileOptions(...))``; a leave-one-compound-out fold uses
``profile_parts`` with ``query_compounds`` and pools the folds' parts with ``summarize_parts``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pandas as pd

from mcnn_jax.evaluation import mean_ap
from mcnn_jax.evaluation import normalize as norm
from mcnn_jax.evaluation.profiles import (
    CONTROL,
    NSCB_RULES,
    PLAN_MASKS,
    TableError,
    feature_columns,
    nearest_neighbours,
    nn_accuracy,
    nscb_plan,
    treatment_profiles,
    well_profiles,
)

LEVELS = ("image", "well")
MODES = ("nsc", "nscb")


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    normalize: tuple = ()  # evaluation.normalize steps, in order
    reg: float = 1.0  # TVN / CORAL regularisation (DeepProfiler's REG_PARAM)
    level: str = "image"  # image | well
    nscb_rule: str = "field"  # field | strict (profiles.nscb_plan)
    control: str = CONTROL
    map: bool = True  # mAP through copairs
    null_size: int = 10000  # copairs' null distribution for the mAP p-values
    threshold: float = 0.05  # corrected p below this: active / consistent
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "normalize", norm.parse_steps(self.normalize))
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.nscb_rule not in NSCB_RULES:
            raise ValueError(f"the NSCB rule must be one of {', '.join(NSCB_RULES)}, got {self.nscb_rule!r}")
        if self.reg <= 0 and {"tvn", "coral"} & set(self.normalize):
            raise ValueError(
                f"the TVN / CORAL regularisation must be positive, got {self.reg} (with fewer control rows than "
                f"features the controls' covariance is singular)"
            )
        if self.null_size < 1:
            raise ValueError(f"null_size must be >= 1, got {self.null_size}")


def profile_parts(
    df: pd.DataFrame, opts: ProfileOptions = ProfileOptions(), source: str = "the table", query_compounds=None
) -> dict:
    """The per-query pieces of the report: ``matches`` {nsc, nscb} (one row per query treatment), ``ap``
    {activity, nsc, nscb} (one AP per query), ``plan`` (what NSCB leaves out), the rows' ``level`` and the
    number of treatments. ``query_compounds``: only these compounds' treatments (rows) are queries."""
    features = feature_columns(df, source)
    rows = norm.normalize(df, features, opts.normalize, opts.control, opts.reg, source)
    bad = [f for f, ok in zip(features, np.isfinite(rows[features].to_numpy(np.float64)).all(0)) if not ok]
    if bad:
        raise TableError(
            f"{source}: {len(bad)} feature(s) have missing or infinite values"
            f"{' after normalisation' if opts.normalize else ''}: {', '.join(map(str, bad[:10]))}"
            f"{' ...' if len(bad) > 10 else ''} (drop those columns, e.g. pycytominer's drop_na_columns)"
        )
    if opts.level == "well":
        rows = well_profiles(rows, features, source)
    prof = treatment_profiles(rows, features, source)
    plan = nscb_plan(prof, opts.control, opts.nscb_rule)
    queries = None if query_compounds is None else prof["Metadata_Compound"].isin(list(query_compounds)).to_numpy()
    matches = {m: nearest_neighbours(prof, features, m, opts.control, queries, opts.nscb_rule, plan) for m in MODES}
    ap = {}
    if opts.map:
        ap["activity"] = mean_ap.activity_ap(rows, features, opts.control, query_compounds)
        for m in MODES:
            ap[m] = mean_ap.consistency_ap(prof, features, m, opts.control, opts.nscb_rule, query_compounds, plan)
    return dict(
        matches=matches,
        ap=ap,
        plan={k: v for k, v in plan.items() if k not in PLAN_MASKS},
        level=opts.level,
        rows=len(rows),
        partly_shared_batches=mean_ap.partly_shared_batches(prof, opts.control),
    )


def summarize_parts(parts: list[dict], opts: ProfileOptions = ProfileOptions()) -> dict:
    """Pools the parts of one or more ``profile_parts`` calls (e.g. one per fold) into the report."""
    if not parts:
        raise ValueError("no profile parts to pool")
    out = dict(
        options=dataclasses.asdict(opts),
        level=opts.level,
        nscb_plan=parts[0]["plan"],
        partly_shared_batches=sorted({t for p in parts for t in p["partly_shared_batches"]}),
    )
    for m in MODES:
        matches = pd.concat([p["matches"][m] for p in parts], ignore_index=True)
        out[m] = dict(nn_accuracy(matches), matches=matches)
    if opts.map:
        pooled = {k: pd.concat([p["ap"][k] for p in parts], ignore_index=True) for k in ("activity", *MODES)}
        out["map"] = dict(
            activity=mean_ap.summarize(pooled["activity"], "treatment", opts.null_size, opts.threshold, opts.seed),
            **{
                f"moa_{m}": mean_ap.summarize(pooled[m], "Metadata_MoA", opts.null_size, opts.threshold, opts.seed)
                for m in MODES
            },
        )
    return out


def profile_report(
    df: pd.DataFrame, opts: ProfileOptions = ProfileOptions(), source: str = "the table", query_compounds=None
) -> dict:
    """NSC, NSCB (with what it left out) and mAP of a table: see the module docstring."""
    return summarize_parts([profile_parts(df, opts, source, query_compounds)], opts)


# --- printing --------------------------------------------------------------------------------------------------
def fraction(x) -> str:
    """A fraction (an accuracy, a mean AP) for a report line; ``n/a`` where there is none."""
    return "n/a" if x is None else f"{x:.4f}"


def format_profile_report(res: dict, matches: bool = True) -> str:
    """The report as text: NSC, NSCB with what it left out, mAP; every match unless ``matches`` is False."""
    o = res["options"]
    lines = [
        f"profiles: {res['level']} level, normalisation {','.join(o['normalize']) or 'none'}"
        + (f" (reg {o['reg']:g})" if {"tvn", "coral"} & set(o["normalize"]) else "")
        + f", NSCB rule {o['nscb_rule']}, control {o['control']}"
    ]
    plan = res["nscb_plan"]
    for m in MODES:
        r = res[m]
        lines.append(
            f"{m.upper()}: 1-NN MoA accuracy {fraction(r['accuracy'])} over {r['treatments']} treatments"
            + (f" ({r['without_neighbour']} without an allowed neighbour)" if r["without_neighbour"] else "")
            + (f" ({res['level']}-level profiles)" if res["level"] != "image" and m == "nsc" else "")
        )
        if m == "nscb":
            for moa, why in plan["left_out_moas"].items():
                lines.append(f"  left out: {moa}: {why}")
            for c, x in plan["every_batch"]:
                lines.append(
                    f"  {c} @ {x:g} is imaged in every batch: "
                    + (
                        "the batch condition is waived for it, as query and as neighbour (the field's rule; "
                        "--nscb-rule strict leaves it out)"
                        if plan["rule"] == "field"
                        else "left out (--nscb-rule strict)"
                    )
                )
        if matches:
            for t in r["matches"].itertuples(index=False):
                mark = "-" if pd.isna(t.correct) else ("ok" if t.correct else "x")
                lines.append(
                    f"  {mark:>2} {t[0]} @ {t[1]:g} ({t[2]}) -> {t.neighbour_compound} @ "
                    f"{t.neighbour_concentration:g} ({t.neighbour_moa})"
                )
    if "map" in res:
        a = res["map"]["activity"]
        lines.append(
            f"mAP, phenotypic activity ({res['level']}s against the controls): mean AP {fraction(a['mean_ap'])} "
            f"over {a['queries']} queries; "
            + (
                f"{sum(g['significant'] for g in a['per_group'])} of {a['groups']} treatments active "
                f"(corrected p < {a['threshold']:g}), {a['compounds_retrieved']} of {a['compounds']} "
                f"compounds retrieved ({fraction(a['fraction_compounds_retrieved'])})"
                if a["groups"]
                else "no treatment with replicates"
            )
        )
        for m, what in (("nsc", "another compound"), ("nscb", "another compound and batch")):
            c = res["map"][f"moa_{m}"]
            lines.append(
                f"mAP, MoA consistency ({what}): mean AP {fraction(c['mean_ap'])} over {c['queries']} "
                f"treatments; "
                + (
                    f"{sum(g['significant'] for g in c['per_group'])} of {c['groups']} "
                    f"MoAs significant (corrected p < {c['threshold']:g})"
                    if c["groups"]
                    else "no MoA with a positive pair"
                )
            )
    if res.get("partly_shared_batches"):
        lines.append(
            "note: treatments in some but not all batches (the mAP form of NSCB compares batch lists "
            "as labels, NSCB requires disjoint batches): " + ", ".join(res["partly_shared_batches"])
        )
    return "\n".join(lines)


def to_json(res: dict) -> dict:
    """The report with its match tables as records."""
    out = {k: v for k, v in res.items() if k not in MODES}
    for m in MODES:
        out[m] = dict(res[m], matches=json.loads(res[m]["matches"].to_json(orient="records")))
    return out


# --- the command line ------------------------------------------------------------------------------------------
def add_options(p: argparse.ArgumentParser) -> None:
    """The profiling options, shared by ``mcnn-profile-eval`` and ``mcnn-loco``."""
    d = ProfileOptions()
    p.add_argument(
        "--normalize",
        default="",
        metavar="STEPS",
        help="normalise the rows against the control rows first, with these comma-separated steps in "
        f"order: {', '.join(norm.STEPS)} (plate: standardise per plate; tvn: whitening fitted "
        "on the controls; coral: align each batch's control covariance; DeepProfiler's BBBC021 "
        "evaluation uses tvn,coral); the steps are required (--normalize plate for the per-plate standardisation)",
    )
    p.add_argument("--reg", type=float, default=d.reg, help=f"TVN / CORAL regularisation (default {d.reg})")
    p.add_argument(
        "--level",
        choices=LEVELS,
        default=d.level,
        help="image: treatment profiles from image rows (default); well: average each well's sites first",
    )
    p.add_argument(
        "--nscb-rule",
        choices=NSCB_RULES,
        default=d.nscb_rule,
        help="a treatment imaged in every batch (BBBC021's taxol 0.3): field (default) waives the "
        "batch condition for it; strict leaves it out of NSCB",
    )
    p.add_argument("--control", default=d.control, help=f"the control compound (never a query; default {d.control})")
    p.add_argument("--no-map", action="store_true", help="skip the mAP figures (copairs)")
    p.add_argument(
        "--null-size",
        type=int,
        default=d.null_size,
        help=f"size of copairs' null distribution for the mAP p-values (default {d.null_size})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the null distribution")


def options_from_args(args) -> ProfileOptions:
    return ProfileOptions(
        normalize=args.normalize,
        reg=args.reg,
        level=args.level,
        nscb_rule=args.nscb_rule,
        control=args.control,
        map=not args.no_map,
        null_size=args.null_size,
        seed=args.seed,
    )
