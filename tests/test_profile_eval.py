"""The field's profiling protocol: NSCB on the real BBBC021 layout (counts and a hand-checked value), TVN and
CORAL against closed forms, mAP through copairs against hand-computed APs, well-level profiles, pycytominer on
our tables, and the command line."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
from conftest import BBBC021_CSVS

from mcnn_jax.cli.profile_eval import main as profile_eval_cli
from mcnn_jax.data.bbbc021 import metadata_table
from mcnn_jax.evaluation import mean_ap as M
from mcnn_jax.evaluation import normalize as N
from mcnn_jax.evaluation import profile_metrics as E
from mcnn_jax.evaluation import profiles as P

MOAS_ONE_BATCH = {"Cholesterol-lowering": "Week9", "Kinase inhibitors": "Week7"}
# treatments made to look like another MoA (0.9 of its direction, 0.1 of their own): their NSC / NSCB neighbour
# is of that MoA, so they are wrong, and every other treatment has a correct neighbour (see test below)
CONFUSED = {("colchicine", 0.03): "Epithelial", ("AZ258", 1.0): "Epithelial", ("emetine", 0.3): "Epithelial"}


@pytest.fixture(scope="module")
def bbbc021():
    """The layout with features: one direction per MoA (DMSO included), CONFUSED leaning to another MoA."""
    df = metadata_table(BBBC021_CSVS)
    moas = sorted(df.Metadata_MoA.unique())
    f = np.zeros((len(df), len(moas)))
    f[np.arange(len(df)), [moas.index(m) for m in df.Metadata_MoA]] = 1.0
    for (c, x), other in CONFUSED.items():
        rows = ((df.Metadata_Compound == c) & (df.Metadata_Concentration == x)).to_numpy()
        assert rows.any(), (c, x)
        f[rows] *= 0.1
        f[rows, moas.index(other)] = 0.9
    return pd.concat([df, pd.DataFrame(f, columns=[f"f{k:02d}" for k in range(len(moas))])], axis=1)


def test_bbbc021_layout_counts_and_the_field_rule(bbbc021):
    assert len(bbbc021) == 3848
    no_map = E.ProfileOptions(map=False)
    res = E.profile_report(bbbc021, no_map)
    plan = res["nscb_plan"]
    assert set(plan["left_out_moas"]) == set(MOAS_ONE_BATCH)
    for moa, week in MOAS_ONE_BATCH.items():
        assert f"all lie in batch {week}" in plan["left_out_moas"][moa]
    assert plan["every_batch"] == [("taxol", 0.3)]
    assert res["nsc"]["treatments"] == 103 and res["nscb"]["treatments"] == 92
    assert res["nsc"]["without_neighbour"] == res["nscb"]["without_neighbour"] == 0
    nscb = res["nscb"]["matches"]
    assert not nscb.Metadata_MoA.isin(list(MOAS_ONE_BATCH)).any()
    assert not nscb.neighbour_moa.isin(list(MOAS_ONE_BATCH)).any()
    # Hand-checked: every MoA has several compounds, and each MoA kept by NSCB spans two or more weeks while a
    # compound sits in one (taxol @ 0.3 aside), so every query has an allowed neighbour of its own direction
    # (similarity 1) except the three CONFUSED treatments, whose best match leans 0.9 to Epithelial (in three
    # weeks, so always reachable): 100 / 103 and 89 / 92.
    assert res["nsc"]["accuracy"] == pytest.approx(100 / 103)
    assert res["nscb"]["accuracy"] == pytest.approx(89 / 92)
    wrong = {(r.Metadata_Compound, r.Metadata_Concentration) for r in nscb.itertuples() if not r.correct}
    assert wrong == set(CONFUSED)
    assert set(nscb[~nscb.correct.astype(bool)].neighbour_moa) == {"Epithelial"}
    # taxol @ 0.3 (every week) is a query whose neighbour may share its week, and a neighbour of others
    taxol = nscb[(nscb.Metadata_Compound == "taxol") & (nscb.Metadata_Concentration == 0.3)]
    assert len(taxol) == 1 and taxol.correct.iat[0]
    strict = E.profile_report(bbbc021, E.ProfileOptions(map=False, nscb_rule="strict"))
    assert strict["nscb"]["treatments"] == 91 and strict["nscb"]["accuracy"] == pytest.approx(88 / 91)
    assert not (
        (strict["nscb"]["matches"].neighbour_compound == "taxol")
        & (strict["nscb"]["matches"].neighbour_concentration == 0.3)
    ).any()
    # every NSCB pair is of another compound and shares no week, unless one side is taxol @ 0.3
    prof = P.treatment_profiles(bbbc021)
    weeks = {
        (c, x): set(b.split(";"))
        for c, x, b in zip(prof.Metadata_Compound, prof.Metadata_Concentration, prof.Metadata_Batches)
    }
    for r in strict["nscb"]["matches"].itertuples():
        q, n = (r.Metadata_Compound, r.Metadata_Concentration), (r.neighbour_compound, r.neighbour_concentration)
        assert q[0] != n[0] and not weeks[q] & weeks[n]


def test_the_cli_names_what_nscb_leaves_out(bbbc021, tmp_path, capsys):
    bbbc021.to_parquet(tmp_path / "t.parquet")
    profile_eval_cli(
        [str(tmp_path / "t.parquet"), "--quiet", "--json", str(tmp_path / "r.json"), "--null-size", "2000"]
    )
    out = capsys.readouterr().out
    assert "NSC: 1-NN MoA accuracy 0.9709 over 103 treatments" in out
    assert "NSCB: 1-NN MoA accuracy 0.9674 over 92 treatments" in out
    assert "left out: Cholesterol-lowering: its 6 treatment(s) all lie in batch Week9" in out
    assert "left out: Kinase inhibitors: its 5 treatment(s) all lie in batch Week7" in out
    assert "taxol @ 0.3 is imaged in every batch: the batch condition is waived" in out
    assert "mAP, phenotypic activity (images against the controls)" in out and "103 treatments active" in out
    assert "38 of 38 compounds retrieved" in out and "MoA consistency (another compound and batch)" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["nscb"]["treatments"] == 92 and len(doc["nscb"]["matches"]) == 92
    assert doc["map"]["moa_nscb"]["queries"] == 92 and doc["map"]["moa_nsc"]["queries"] == 103


def test_map_on_the_bbbc021_layout(bbbc021):
    res = E.profile_report(bbbc021, E.ProfileOptions(null_size=2000))
    act = res["map"]["activity"]
    # replicates are identical and unlike DMSO: every treatment ranks its replicates first
    assert act["mean_ap"] == pytest.approx(1.0) and act["fraction_significant"] == 1.0
    assert act["queries"] == int((bbbc021.Metadata_Compound != "DMSO").sum()) and act["compounds_retrieved"] == 38
    for form, n in (("moa_nsc", 103), ("moa_nscb", 92)):
        c = res["map"][form]
        assert c["queries"] == n and 0.5 < c["mean_ap"] < 1.0
    ap = M.consistency_ap(P.treatment_profiles(bbbc021), [f"f{k:02d}" for k in range(13)], "nscb")
    by = {(c, x): a for c, x, a in zip(ap.Metadata_Compound, ap.Metadata_Concentration, ap.average_precision)}
    assert all(by[t] < 0.4 for t in CONFUSED)  # their MoA's treatments rank behind Epithelial's
    eg5 = ap[ap.Metadata_MoA == "Eg5 inhibitors"]  # an MoA untouched by CONFUSED: positives first
    assert len(eg5) == 12 and (eg5.average_precision == 1.0).all()


def test_average_precision_by_hand():
    # query q (MoA a, compound x); candidates by cosine: p1 (a, y) 0.99, n1 (b) 0.9, p2 (a, z) 0.5, n2 (b) -1;
    # q's AP = (1/1 + 2/3) / 2 = 0.8333 (the same-compound x2 is no candidate)
    def v(deg):
        return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]

    prof = pd.DataFrame(
        dict(
            Metadata_Compound=["x", "x", "y", "z", "u", "w"],
            Metadata_Concentration=[1.0, 2.0, 1, 1, 1, 1],
            Metadata_MoA=["a", "a", "a", "a", "b", "b"],
            Metadata_Batches=["W1"] * 6,
        )
    )
    f = np.array([v(0), v(1), v(np.degrees(np.arccos(0.99))), v(60), v(np.degrees(np.arccos(0.9))), v(180)])
    prof[["f0", "f1"]] = f
    ap = M.consistency_ap(prof, ["f0", "f1"], "nsc").set_index(["Metadata_Compound", "Metadata_Concentration"])
    assert ap.loc[("x", 1.0), "average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert ap.loc[("x", 1.0), "n_pos_pairs"] == 2 and ap.loc[("x", 1.0), "n_total_pairs"] == 4


def test_tvn_against_its_closed_form():
    rng = np.random.default_rng(0)
    mix = np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.4, 0.0, 0.2]])
    x = rng.normal(size=(40, 3)) @ mix + [5, -1, 2]
    df = pd.DataFrame(x, columns=["a", "b", "c"]).assign(Metadata_Compound=["DMSO"] * 30 + ["X"] * 10)
    ctrl = x[:30]
    mu, cov = ctrl.mean(0), np.cov(ctrl.T, bias=True)
    for reg in (0.0, 1.0):
        want = (x - mu) @ np.linalg.inv(np.real(scipy.linalg.sqrtm(cov + reg * np.eye(3))))
        got = N.tvn(df, ["a", "b", "c"], reg=reg)[["a", "b", "c"]].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    white = N.tvn(df, ["a", "b", "c"], reg=0.0)[["a", "b", "c"]].to_numpy()[:30]
    np.testing.assert_allclose(white.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(np.cov(white.T, bias=True), np.eye(3), atol=1e-9)
    # DeepProfiler's form V (S + reg)^(-1/2) differs by a rotation: the cosine similarities are the same
    s, v = np.linalg.eigh(cov)
    theirs = (x - mu) @ v @ np.diag(1 / np.sqrt(s + 1.0))
    ours = N.tvn(df, ["a", "b", "c"], reg=1.0)[["a", "b", "c"]].to_numpy()

    def cos(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return a @ a.T

    np.testing.assert_allclose(cos(ours), cos(theirs), atol=1e-10)


def test_coral_against_its_closed_form():
    rng = np.random.default_rng(1)
    parts = []
    for week, scale in (("Week1", [1.0, 3.0]), ("Week2", [2.0, 0.5])):
        x = rng.normal(size=(25, 2)) * scale + rng.normal(size=2)
        parts.append(
            pd.DataFrame(x, columns=["a", "b"]).assign(
                Metadata_Plate=f"{week}_1", Metadata_Compound=["DMSO"] * 15 + ["X"] * 10
            )
        )
    df = pd.concat(parts, ignore_index=True)
    x = df[["a", "b"]].to_numpy()
    ctrl = (df.Metadata_Compound == "DMSO").to_numpy()

    def second(m):
        return m.T @ m / len(m)

    for reg in (0.0, 1.0):
        got = N.coral(df, ["a", "b"], reg=reg)[["a", "b"]].to_numpy()
        target = np.real(scipy.linalg.sqrtm(second(x[ctrl]) + reg * np.eye(2)))
        for w in range(2):
            rows = np.arange(25 * w, 25 * (w + 1))
            src = np.linalg.inv(np.real(scipy.linalg.sqrtm(second(x[rows[ctrl[rows]]]) + reg * np.eye(2))))
            np.testing.assert_allclose(got[rows], x[rows] @ src @ target, rtol=1e-9, atol=1e-9)
            if reg == 0.0:  # each week's controls take the second moment of all controls
                np.testing.assert_allclose(second(got[rows[ctrl[rows]]]), second(x[ctrl]), rtol=1e-9)
    with pytest.raises(P.TableError, match="batch 'Week3' has no DMSO"):
        N.coral(pd.concat([df, df.iloc[:3].assign(Metadata_Plate="Week3_1", Metadata_Compound="X")]), ["a", "b"])


def test_normalisation_steps_run_in_order_and_bad_steps_are_named():
    assert N.parse_steps("tvn,coral") == ("tvn", "coral") and N.parse_steps(True) == ("plate",)
    assert N.parse_steps("") == () and N.parse_steps(None) == ()
    with pytest.raises(ValueError, match="unknown normalisation step.*'zca'.*plate, tvn, coral"):
        N.parse_steps("tvn,zca")
    df = pd.DataFrame(
        dict(
            Metadata_Plate=["W1_1"] * 4,
            Metadata_Compound=["DMSO", "DMSO", "DMSO", "X"],
            a=[1.0, 2.0, 4.0, 8.0],
            b=[0.0, 1.0, 0.0, 5.0],
        )
    )
    both = N.normalize(df, ["a", "b"], "plate,tvn")
    np.testing.assert_allclose(
        both[["a", "b"]].to_numpy(), N.tvn(N.standardize_per_plate(df, ["a", "b"]), ["a", "b"])[["a", "b"]].to_numpy()
    )
    with pytest.raises(P.TableError, match="TVN is fitted on the DMSO .* has 1"):
        N.tvn(df.assign(Metadata_Compound=["DMSO", "X", "X", "X"]), ["a", "b"])


def test_well_level_profiles():
    # two wells of treatment X (sites 1, 2 each), one of DMSO; well means, then the treatment's median of them
    df = pd.DataFrame(
        dict(
            Metadata_Plate=["W1_1"] * 6,
            Metadata_Well=["A01", "A01", "A02", "A02", "B01", "B01"],
            Metadata_Compound=["X"] * 4 + ["DMSO"] * 2,
            Metadata_Concentration=[1.0] * 4 + [0.0] * 2,
            Metadata_MoA=["m"] * 4 + ["DMSO"] * 2,
            f=[1.0, 3.0, 10.0, 30.0, 0.0, 0.0],
        )
    )
    wells = P.well_profiles(df)
    assert list(wells.f) == [2.0, 20.0, 0.0] and list(wells.Metadata_Images) == [2, 2, 2]
    assert list(wells.Metadata_Compound) == ["X", "X", "DMSO"]
    prof = P.treatment_profiles(wells)
    assert prof.set_index("Metadata_Compound").loc["X", "f"] == 11.0  # median of 2 and 20 (of images: 6.5)
    with pytest.raises(P.TableError, match=r"well \('W1_1', 'A01'\) holds more than one treatment"):
        P.well_profiles(df.assign(Metadata_Compound=["X", "Y"] + ["X"] * 2 + ["DMSO"] * 2))


def test_well_level_on_the_bbbc021_layout(bbbc021):
    res = E.profile_report(bbbc021, E.ProfileOptions(level="well", normalize="tvn,coral", null_size=1000))
    assert res["nsc"]["treatments"] == 103 and res["nscb"]["treatments"] == 92
    wells = bbbc021.groupby(["Metadata_Plate", "Metadata_Well"]).ngroups
    assert (
        res["map"]["activity"]["queries"]
        == wells - bbbc021[bbbc021.Metadata_Compound == "DMSO"].groupby(["Metadata_Plate", "Metadata_Well"]).ngroups
    )


def test_pycytominer_on_our_tables(bbbc021):
    pycytominer = pytest.importorskip("pycytominer")  # a dev dependency: installed by launch/install.sh --dev
    features = [c for c in bbbc021.columns if c.startswith("f")]
    meta = ["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration", "Metadata_MoA"]
    rng = np.random.default_rng(0)
    table = bbbc021.assign(**{c: bbbc021[c] + 0.01 * rng.normal(size=len(bbbc021)) for c in features})
    wells = pycytominer.aggregate(table, strata=meta, features=features, operation="mean")
    norm = pycytominer.normalize(
        wells, features=features, meta_features=meta, samples="Metadata_Compound == 'DMSO'", method="standardize"
    )
    kept = pycytominer.feature_select(norm, features=features, operation=["variance_threshold", "drop_na_columns"])
    assert len(wells) == bbbc021.groupby(["Metadata_Plate", "Metadata_Well"]).ngroups
    res = E.profile_report(kept, E.ProfileOptions(map=False))
    assert res["nsc"]["treatments"] == 103 and res["nscb"]["treatments"] == 92


def test_bad_options_are_named(bbbc021, tmp_path, capsys):
    with pytest.raises(ValueError, match="level must be one of image, well"):
        E.ProfileOptions(level="plate")
    with pytest.raises(ValueError, match="NSCB rule must be one of field, strict"):
        E.ProfileOptions(nscb_rule="loose")
    path = tmp_path / "t.csv"
    bbbc021.drop(columns=["Metadata_Well"]).to_csv(path, index=False)
    with pytest.raises(SystemExit) as e:
        profile_eval_cli([str(path), "--level", "well", "--no-map"])
    assert (
        e.value.code == 2
        and "lacks the column(s) Metadata_Well needed for well-level profiles" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as e:
        profile_eval_cli([str(path), "--normalize", "whiten"])
    assert e.value.code == 2 and "unknown normalisation step(s) 'whiten'" in capsys.readouterr().err


@pytest.mark.parametrize("copy_on_write", [False, True])
def test_normalisations_under_pandas_copy_on_write(copy_on_write):
    """pycytominer switches pandas' copy-on-write on when imported (then ``to_numpy`` gives read-only views):
    every normalisation must work, and give the same result, either way."""
    df = pd.DataFrame(
        dict(
            Metadata_Plate=["W1_1"] * 3 + ["W2_1"] * 3,
            Metadata_Compound=["DMSO", "DMSO", "X"] * 2,
            a=[1.0, 3.0, 4.0, 10.0, 30.0, 40.0],
            b=[0.0, 1.0, 5.0, 2.0, 0.0, 1.0],
        )
    )
    with pd.option_context("mode.copy_on_write", copy_on_write):
        out = N.normalize(df, ["a", "b"], "plate,tvn,coral")
    with pd.option_context("mode.copy_on_write", False):
        ref = N.normalize(df, ["a", "b"], "plate,tvn,coral")
    np.testing.assert_allclose(out[["a", "b"]].to_numpy(), ref[["a", "b"]].to_numpy())
    assert df.a.tolist() == [1.0, 3.0, 4.0, 10.0, 30.0, 40.0]  # the input table is left as it was


def test_folds_pool_when_a_fold_has_nothing_for_nscb(bbbc021):
    """A leave-one-compound-out fold whose compound's MoA NSCB leaves out (simvastatin: Cholesterol-lowering) has
    no NSCB query and no NSCB AP; pooled with another fold the report still forms (typed empty tables)."""
    opts = E.ProfileOptions(null_size=500)
    left_out = E.profile_parts(bbbc021, opts, query_compounds=["simvastatin"])
    kept = E.profile_parts(bbbc021, opts, query_compounds=["colchicine"])
    assert len(left_out["ap"]["nscb"]) == 0 and len(left_out["matches"]["nscb"]) == 0
    assert len(left_out["matches"]["nsc"]) == 3  # simvastatin's three concentrations are NSC queries
    res = E.summarize_parts([left_out, kept], opts)
    n_colchicine = len(kept["matches"]["nscb"])
    assert n_colchicine > 0 and res["nscb"]["treatments"] == n_colchicine
    assert res["map"]["moa_nscb"]["queries"] == n_colchicine and res["map"]["moa_nsc"]["queries"] == 3 + n_colchicine
    with pytest.raises(ValueError, match="no profile parts"):
        E.summarize_parts([], opts)


def test_features_that_are_not_finite_are_named(bbbc021):
    bad = bbbc021.assign(f03=np.where(np.arange(len(bbbc021)) == 5, np.nan, bbbc021.f03))
    with pytest.raises(P.TableError, match="1 feature.*missing or infinite values: f03"):
        E.profile_report(bad, E.ProfileOptions(map=False))
    with pytest.raises(ValueError, match="regularisation must be positive"):
        E.ProfileOptions(normalize="tvn", reg=0.0)
    with pytest.raises(P.TableError, match="NSCB needs a batch"):
        E.profile_report(bbbc021.drop(columns=["Metadata_Plate"]), E.ProfileOptions(map=False))
