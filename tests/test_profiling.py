"""Treatment profiles, NSC / NSCB nearest-neighbour matching and treatment-level accuracy on hand-built tables
whose answers are worked out here."""

import json

import numpy as np
import pandas as pd
import pytest

from mcnn_jax.cli.profile_eval import main as profile_eval_cli
from mcnn_jax.evaluation import normalize as N
from mcnn_jax.evaluation import profile_metrics as E
from mcnn_jax.evaluation import profiles as P

# (compound, concentration, MoA, plate, angle in degrees) of hand-placed 2-d treatment profiles
TREATMENTS = [
    ("A", 1.0, "m1", "Week1_100", 0),
    ("A", 2.0, "m1", "Week1_100", 5),
    ("B", 1.0, "m1", "Week1_101", 10),
    ("C", 1.0, "m1", "Week2_200", 52),
    ("D", 1.0, "m2", "Week2_200", 30),
    ("E", 1.0, "m2", "Week1_101", 80),
    ("F", 1.0, "m2", "Week2_201", 85),
]
# NSC (another compound), cosine = angle: A@1 -> B (10 deg), A@2 -> B (5), B -> A@2 (5), C -> D (22), D -> B (20),
# E -> F (5), F -> E (5): correct for A, A, B, E, F = 5 / 7.
NSC = {
    ("A", 1.0): "B",
    ("A", 2.0): "B",
    ("B", 1.0): "A",
    ("C", 1.0): "D",
    ("D", 1.0): "B",
    ("E", 1.0): "F",
    ("F", 1.0): "E",
}
# NSCB (another compound in another week): A, A and B (Week1) only see C, D, F (Week2): D is nearest (m2, wrong);
# C -> E (28, wrong), D -> B (20, wrong), E -> F (right), F -> E (right): 2 / 7.
NSCB = {
    ("A", 1.0): "D",
    ("A", 2.0): "D",
    ("B", 1.0): "D",
    ("C", 1.0): "E",
    ("D", 1.0): "B",
    ("E", 1.0): "F",
    ("F", 1.0): "E",
}


def _image_rows(compound, conc, moa, plate, angle):
    v = np.array([np.cos(np.radians(angle)), np.sin(np.radians(angle))])
    # images v, 2v and an outlier (100, 100): the per-feature median is 2v (same angle); a mean would not be
    return [
        dict(
            Metadata_Compound=compound,
            Metadata_Concentration=conc,
            Metadata_MoA=moa,
            Metadata_Plate=plate,
            Metadata_Well="B02",
            f0=x[0],
            f1=x[1],
        )
        for x in (v, 2 * v, np.array([100.0, 100.0]))
    ]


@pytest.fixture()
def table():
    rows = [r for t in TREATMENTS for r in _image_rows(*t)]
    # DMSO at 1 degree on every plate: it would be A@1's nearest if controls could be neighbours
    for plate in ("Week1_100", "Week1_101", "Week2_200", "Week2_201"):
        rows += _image_rows("DMSO", 0.0, "DMSO", plate, 1)
    return pd.DataFrame(rows)


def test_batch_is_the_week_prefix():
    assert P.batch_of_plate("Week1_22123") == "Week1" and P.batch_of_plate("Week10_1") == "Week10"
    assert P.batch_of_plate("plate7") == "plate7"


def test_profiles_are_medians_per_treatment(table):
    prof = P.treatment_profiles(table)
    assert len(prof) == len(TREATMENTS) + 1
    a = prof[(prof.Metadata_Compound == "A") & (prof.Metadata_Concentration == 1.0)].iloc[0]
    assert a.f0 == pytest.approx(2.0) and a.f1 == pytest.approx(0.0) and a.Metadata_Images == 3
    assert a.Metadata_Batches == "Week1"
    assert prof[prof.Metadata_Compound == "DMSO"].iloc[0].Metadata_Batches == "Week1;Week2"


@pytest.mark.parametrize("mode,expected,accuracy", [("nsc", NSC, 5 / 7), ("nscb", NSCB, 2 / 7)])
def test_nsc_nscb_on_a_worked_example(table, mode, expected, accuracy):
    res = E.profile_report(table, E.ProfileOptions(map=False))[mode]
    m = res["matches"]
    assert dict(zip(zip(m.Metadata_Compound, m.Metadata_Concentration), m.neighbour_compound)) == expected
    assert "DMSO" not in set(m.Metadata_Compound) | set(m.neighbour_compound)
    assert res["accuracy"] == pytest.approx(accuracy) and res["treatments"] == 7


def test_query_compounds_and_missing_neighbours(table):
    no_map = E.ProfileOptions(map=False)
    res = E.profile_report(table, no_map, query_compounds=["E"])
    assert list(res["nsc"]["matches"].Metadata_Compound) == ["E"] and res["nsc"]["accuracy"] == 1.0
    one_week = table[table.Metadata_Plate.str.startswith("Week1")]
    res = E.profile_report(one_week, no_map)  # one batch: both MoAs lie in it, so NSCB leaves them out
    assert res["nscb"]["accuracy"] is None and res["nscb"]["treatments"] == 0
    assert set(res["nscb_plan"]["left_out_moas"]) == {"m1", "m2"} and res["nsc"]["treatments"] == 4
    assert "all lie in batch Week1" in res["nscb_plan"]["left_out_moas"]["m1"]
    # without D and F, m2 is E alone, in Week1: left out, as query (it would have no allowed neighbour) and as
    # neighbour; m1 (A, B in Week1; C in Week2) stays, and its treatments can only match each other across weeks
    some = table[~table.Metadata_Compound.isin(["D", "F"])]
    res = E.profile_report(some, no_map)
    assert list(res["nscb_plan"]["left_out_moas"]) == ["m2"]
    assert res["nscb"]["treatments"] == 4 and res["nscb"]["accuracy"] == 1.0 and res["nscb"]["without_neighbour"] == 0
    assert set(res["nscb"]["matches"].neighbour_compound) == {"B", "C"}  # A, A, B -> C (52 deg); C -> B (10)


def test_per_plate_normalisation_against_controls():
    df = pd.DataFrame(
        dict(
            Metadata_Plate=["p1"] * 3 + ["p2"] * 3,
            Metadata_Compound=["DMSO", "DMSO", "X"] * 2,
            f0=[1.0, 3.0, 4.0, 10.0, 30.0, 40.0],
        )
    )
    out = N.standardize_per_plate(df, ["f0"])
    # p1: DMSO mean 2, std 1 -> X = 2; p2: mean 20, std 10 -> X = 2
    assert list(out.f0) == pytest.approx([-1, 1, 2, -1, 1, 2])
    with pytest.raises(P.TableError, match="plate 'p3' has no DMSO"):
        N.standardize_per_plate(pd.concat([df, df.assign(Metadata_Plate="p3", Metadata_Compound="X")]), ["f0"])


def test_treatment_level_accuracy_averages_probabilities():
    # treatment (X, 1): images say m1, m1, m2; mean probabilities (0.4, 0.6) say m2, which is right
    df = pd.DataFrame(
        dict(
            Metadata_Compound=["X", "X", "X", "Y", "Y", "DMSO"],
            Metadata_Concentration=[1.0, 1, 1, 1, 1, 0],
            Metadata_MoA=["m2", "m2", "m2", "m1", "m1", "DMSO"],
            P_m1=[0.6, 0.6, 0.0, 0.9, 0.2, 0.1],
            P_m2=[0.4, 0.4, 1.0, 0.1, 0.8, 0.1],
            P_DMSO=[0, 0, 0, 0, 0, 0.8],
        )
    )
    df["Metadata_Predicted_MoA"] = [c[2:] for c in df[["P_m1", "P_m2", "P_DMSO"]].idxmax(axis=1)]
    tr = P.treatment_predictions(df).set_index("Metadata_Compound")
    assert tr.loc["X", "Metadata_Predicted_MoA"] == "m2" and tr.loc["Y", "Metadata_Predicted_MoA"] == "m1"
    s = P.prediction_summary(df)
    assert s["image_accuracy"] == pytest.approx(3 / 6)  # X: 1 of 3, Y: 1 of 2, DMSO: 1 of 1
    assert s["treatments"] == 2 and s["treatment_accuracy"] == 1.0  # DMSO left out
    comp = s["per_compound"].set_index("Metadata_Compound")
    assert comp.loc["X", "image_accuracy"] == pytest.approx(1 / 3) and comp.loc["X", "treatment_accuracy"] == 1.0


def test_treatment_accuracy_from_arrays():
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8]])
    res = P.treatment_accuracy(probs, [1, 1, 1, 1, 0], ["X", "X", "X", "X", "DMSO"], [1.0, 1.0, 1.0, 2.0, 0.0])
    # (X, 1): mean (0.4, 0.6) -> class 1, right; (X, 2): class 0, wrong; DMSO left out
    assert res == dict(treatment_accuracy=0.5, treatments=2)


def test_bad_tables_name_what_is_missing(table, tmp_path):
    with pytest.raises(P.TableError, match="Metadata_MoA"):
        P.treatment_profiles(table.drop(columns=["Metadata_MoA"]), source="emb.csv")
    with pytest.raises(P.TableError, match="no feature columns"):
        P.treatment_profiles(table.drop(columns=["f0", "f1"]))
    with pytest.raises(P.TableError, match="more than one Metadata_MoA"):
        P.treatment_profiles(table.assign(Metadata_MoA=[f"m{i % 2}" for i in range(len(table))]))
    with pytest.raises(P.TableError, match="P_<class>"):
        P.treatment_predictions(table)
    path = tmp_path / "bad.csv"
    table.drop(columns=["Metadata_Concentration"]).to_csv(path, index=False)
    with pytest.raises(SystemExit) as e:
        profile_eval_cli([str(path)])
    assert e.value.code == 2


def test_cli_on_parquet_and_csv(table, tmp_path, capsys):
    for name in ("emb.parquet", "emb.csv"):
        P.write_table(table, tmp_path / name)
        profile_eval_cli([str(tmp_path / name), "--json", str(tmp_path / "res.json"), "--no-map"])
        out = capsys.readouterr().out
        assert "NSC: 1-NN MoA accuracy 0.7143 over 7 treatments" in out
        assert "NSCB: 1-NN MoA accuracy 0.2857" in out and "A @ 1 (m1) -> D @ 1 (m2)" in out
        doc = json.loads((tmp_path / "res.json").read_text())
        assert doc["nscb"]["accuracy"] == pytest.approx(2 / 7) and len(doc["nsc"]["matches"]) == 7


def test_the_strict_rule_leaves_out_an_moa_kept_only_by_an_every_batch_treatment():
    # MoA s: T @ 0.3 in both weeks (every batch) and U in Week1 only; MoA m: A (Week1), B (Week2)
    rows = []
    for comp, conc, moa, plates in [
        ("T", 0.3, "s", ["Week1_1", "Week2_1"]),
        ("U", 1.0, "s", ["Week1_1"]),
        ("A", 1.0, "m", ["Week1_1"]),
        ("B", 1.0, "m", ["Week2_1"]),
        ("DMSO", 0.0, "DMSO", ["Week1_1", "Week2_1"]),
    ]:
        for plate in plates:
            rows.append(
                dict(
                    Metadata_Compound=comp,
                    Metadata_Concentration=conc,
                    Metadata_MoA=moa,
                    Metadata_Plate=plate,
                    f0=1.0 + len(rows),
                    f1=float(len(moa)),
                )
            )
    prof = P.treatment_profiles(pd.DataFrame(rows))
    field, strict = P.nscb_plan(prof, rule="field"), P.nscb_plan(prof, rule="strict")
    assert field["left_out_moas"] == {} and field["every_batch"] == [("T", 0.3)]
    assert list(strict["left_out_moas"]) == ["s"] and "all lie in batch Week1" in strict["left_out_moas"]["s"]
    taking = dict(zip(prof.Metadata_Compound, strict["taking_part"]))
    assert taking == {"A": True, "B": True, "DMSO": False, "T": False, "U": False}
