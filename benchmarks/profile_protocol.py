"""The field's profiling protocol on the real BBBC021 layout: NSC / NSCB / mAP with each normalisation and
profile level, the counts of treatments, and the speed of ``mcnn-profile-eval`` (and copairs). Prints JSON.

    python benchmarks/profile_protocol.py                              # 16 features, every normalisation
    python benchmarks/profile_protocol.py --features 512 --images 4000 --speed-only

The table is every MoA-annotated field of ``BBBC021_v1_image.csv`` (3,848; ``--images N`` adds or drops
fields, drawn from the layout, to reach N) with its real plate, well, compound, concentration and MoA, and
seeded synthetic features: an MoA direction, a compound and a treatment offset, a batch (week) offset and
per-feature gain shared by all of a week's fields (controls included: what the normalisations are for), and
per-field noise. The figures check the protocol and its options end to end; they say nothing about a model.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import emit  # noqa: E402

from mcnn_jax.data.bbbc021 import metadata_table
from mcnn_jax.evaluation import mean_ap as profile_map
from mcnn_jax.evaluation import normalize as profile_norm
from mcnn_jax.evaluation.profile_metrics import ProfileOptions, profile_report
from mcnn_jax.evaluation.profiles import batches, feature_columns, nearest_neighbours, treatment_profiles

SHARED = Path(__file__).resolve().parents[2] / "shared" / "bbbc021"
NORMALISATIONS = ("", "plate", "tvn", "coral", "tvn,coral", "plate,tvn,coral")


def synthetic_table(metadata_dir, features: int = 16, images: int = 0, seed: int = 0) -> pd.DataFrame:
    df = metadata_table(metadata_dir)
    rng = np.random.default_rng(seed)
    if images and images != len(df):
        extra = rng.choice(len(df), images - len(df), replace=True) if images > len(df) else None
        df = (
            pd.concat([df, df.iloc[extra]], ignore_index=True)
            if extra is not None
            else df.iloc[np.sort(rng.choice(len(df), images, replace=False))].reset_index(drop=True)
        )

    def draw(keys, scale):
        table = {k: rng.normal(0, scale, features) for k in sorted(set(keys))}
        return np.stack([table[k] for k in keys])

    moa = draw(df.Metadata_MoA, 1.0)
    moa[(df.Metadata_MoA == "DMSO").to_numpy()] = 0.0
    compound = draw(df.Metadata_Compound, 0.6)
    treatment = draw(list(zip(df.Metadata_Compound, df.Metadata_Concentration)), 0.3)
    week = batches(df).to_list()
    shift = draw(week, 0.8)
    gain = np.exp(draw(week, 0.3))
    x = (moa + compound + treatment + shift) * gain + rng.normal(0, 1.0, (len(df), features))
    return pd.concat([df, pd.DataFrame(x, columns=[f"f{k:03d}" for k in range(features)])], axis=1)


def figures(res: dict) -> dict:
    m = res.get("map", {})
    return dict(
        nsc=res["nsc"]["accuracy"],
        nsc_treatments=res["nsc"]["treatments"],
        nscb=res["nscb"]["accuracy"],
        nscb_treatments=res["nscb"]["treatments"],
        nscb_without_neighbour=res["nscb"]["without_neighbour"],
        **(
            {}
            if not m
            else dict(
                activity_mean_ap=m["activity"]["mean_ap"],
                treatments_active=m["activity"]["fraction_significant"],
                compounds_retrieved=m["activity"]["fraction_compounds_retrieved"],
                moa_nsc_map=m["moa_nsc"]["mean_ap"],
                moa_nsc_significant=m["moa_nsc"]["fraction_significant"],
                moa_nscb_map=m["moa_nscb"]["mean_ap"],
                moa_nscb_significant=m["moa_nscb"]["fraction_significant"],
            )
        ),
    )


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def speed(df: pd.DataFrame, null_size: int) -> dict:
    """Seconds of each stage on ``df``, and of the whole report."""
    feats = feature_columns(df)
    out = {}
    for step in ("plate", "tvn", "coral"):
        _, out[f"normalize_{step}_s"] = timed(profile_norm.normalize, df, feats, step)
    prof, out["treatment_profiles_s"] = timed(treatment_profiles, df, feats)
    for mode in ("nsc", "nscb"):
        _, out[f"{mode}_s"] = timed(nearest_neighbours, prof, feats, mode)
    _, out["map_activity_ap_s"] = timed(profile_map.activity_ap, df, feats)
    ap, out["map_consistency_ap_s"] = timed(profile_map.consistency_ap, prof, feats, "nscb")
    _, out["map_summarize_s"] = timed(profile_map.summarize, ap, "Metadata_MoA", null_size)
    _, out["report_s"] = timed(profile_report, df, ProfileOptions(normalize="tvn,coral", null_size=null_size))
    _, out["report_without_map_s"] = timed(profile_report, df, ProfileOptions(normalize="tvn,coral", map=False))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metadata", default=str(SHARED), help="folder of the BBBC021 CSVs (default ../shared/bbbc021)")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--images", type=int, default=0, help="rows of the table (default: the 3,848 of the layout)")
    p.add_argument("--null-size", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-only", action="store_true", help="only time the stages (no table of figures)")
    p.add_argument("--out", default="", help="also write the JSON here")
    a = p.parse_args(argv)
    df = synthetic_table(a.metadata, a.features, a.images, a.seed)
    result = dict(
        table=dict(
            rows=len(df),
            features=a.features,
            seed=a.seed,
            null_size=a.null_size,
            treatments=int(df.groupby(["Metadata_Compound", "Metadata_Concentration"]).ngroups),
            batches=int(batches(df).nunique()),
        )
    )
    if not a.speed_only:
        rows = []
        for level in ("image", "well"):
            for norm in NORMALISATIONS:
                opts = ProfileOptions(normalize=norm, level=level, null_size=a.null_size, seed=a.seed)
                res, s = timed(profile_report, df, opts)
                rows.append(dict(level=level, normalize=norm or "none", seconds=round(s, 2), **figures(res)))
                print(f"{level:>5} {norm or 'none':<16} {rows[-1]}", file=sys.stderr, flush=True)
        strict, _ = timed(profile_report, df, ProfileOptions(nscb_rule="strict", map=False))
        result.update(figures=rows, strict_rule=figures(strict), nscb_plan=res["nscb_plan"])
    result["speed"] = speed(df, a.null_size)
    emit(result, a.out)


if __name__ == "__main__":
    main()
