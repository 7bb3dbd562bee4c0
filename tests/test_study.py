"""The large-batch study's command (benchmarks/study_large_batch.py) in a tiny form: two recipes at the base
batch and twice it, plus a collapsed-ensemble run; JSON + PNG, and a rerun reuses the finished runs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_the_study_runs_in_a_tiny_form(store, tmp_path):
    import study_large_batch as study

    args = ["--out", str(tmp_path), "--store", store, "--epochs", "1", "--warmup-epochs", "0.5", "--base-batch", "4",
            "--multipliers", "1,2", "--recipes", "nesterov,lars", "--ensemble-batches", "8", "--cycles", "1",
            "--cycle-epochs", "0.5", "--widths", "2,2,2,4,4,4,4",
            "--lr", "nesterov=0.05,lars=2.0", "--ensemble-recipe", "nesterov", "--powersgd", "nesterov:8"]
    result = study.main(args)
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["complete"] and (tmp_path / "study.png").stat().st_size > 10_000
    names = [r["name"] for r in saved["runs"]]
    assert names == ["nesterov_b4", "nesterov_b8", "lars_b4", "lars_b8", "nesterov_b8_ensemble1",
                     "nesterov_b8_powersgd4"]
    for r in saved["runs"]:
        assert 0.0 <= r["final"]["image_accuracy"] <= 1.0 and 0.0 <= r["final"]["treatment_accuracy"] <= 1.0
        assert r["best_val_accuracy"] == max(r["val_accuracy"]) and r["train_loss"] and r["val_loss"]
        assert r["peak_lr"] == pytest.approx({"nesterov": 0.05, "lars": 2.0}[r["recipe"]] * r["multiplier"])
    ensemble = saved["runs"][-2]
    assert ensemble["ensemble"]["members"] == 2 and ensemble["cycles"] == 1
    c = saved["conclusions"]
    reference = saved["runs"][0]["best_val_accuracy"]
    assert c["reference"] == "nesterov_b4" and c["target"] == pytest.approx(round(reference - 0.01, 4))
    assert c["lars"]["gap_to_reference"]["8"] == pytest.approx(reference - saved["runs"][3]["best_val_accuracy"],
                                                                abs=1e-4)
    assert c["powersgd_cost"]["nesterov_b8_powersgd4"] == pytest.approx(
        saved["runs"][1]["best_val_accuracy"] - saved["runs"][-1]["best_val_accuracy"], abs=1e-4)
    assert all(r["epochs_to_target"] is None or r["epochs_to_target"] <= 1.0 for r in saved["runs"])
    again = study.main(args)  # every run is finished: reused, not retrained
    assert [r["wall_s"] for r in again["runs"]] == [r["wall_s"] for r in result["runs"]]


def test_multipliers_for_every_recipe_or_per_recipe():
    import study_large_batch as study

    assert study.multipliers("1,4,16", "lars") == [1, 4, 16]
    assert study.multipliers("nesterov=1,4,16;lars=1,16", "lars") == [1, 16]
    with pytest.raises(SystemExit, match="adamw"):
        study.multipliers("nesterov=1,4,16;lars=1,16", "adamw")
