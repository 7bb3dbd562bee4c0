"""The large-batch study's command (benchmarks/study_large_batch.py) in a tiny form: two recipes at the base
batch and twice it, plus a collapsed-ensemble run; JSON + PNG, and a rerun reuses the finished runs."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_the_study_runs_in_a_tiny_form(store, tmp_path):
    import study_large_batch as study

    args = [
        "--out",
        str(tmp_path),
        "--store",
        store,
        "--epochs",
        "1",
        "--warmup-epochs",
        "0.5",
        "--base-batch",
        "4",
        "--multipliers",
        "1,2",
        "--recipes",
        "nesterov,lars",
        "--ensemble-batches",
        "8",
        "--cycles",
        "1",
        "--cycle-epochs",
        "0.5",
        "--widths",
        "2,2,2,4,4,4,4",
        "--size",
        "128",
        "--merge-pool",
        "2",
        "--lr",
        "nesterov=0.05,lars=2.0",
        "--ensemble-recipe",
        "nesterov",
        "--powersgd",
        "nesterov:8",
        "--ramp",
        "",
    ]
    result = study.main(args)
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["complete"] and (tmp_path / "study.png").stat().st_size > 10_000
    table = (tmp_path / "study.md").read_text()  # the table: a row per run, the ensemble's own row
    assert all(f"| {r['name']} | {r['global_batch']} |" in table for r in saved["runs"])
    assert "| its collapsed ensemble |" in table
    names = [r["name"] for r in saved["runs"]]
    assert names == [
        "nesterov_b4",
        "nesterov_b8",
        "lars_b4",
        "lars_b8",
        "nesterov_b8_ensemble1",
        "nesterov_b8_powersgd4",
    ]
    for r in saved["runs"]:
        assert 0.0 <= r["final"]["image_accuracy"] <= 1.0 and 0.0 <= r["final"]["treatment_accuracy"] <= 1.0
        assert r["best_val_accuracy"] == max(r["val_accuracy"]) and r["train_loss"] and r["val_loss"]
        assert r["peak_lr"] == pytest.approx({"nesterov": 0.05, "lars": 2.0}[r["recipe"]] * r["multiplier"])
    ensemble = saved["runs"][-2]
    assert ensemble["ensemble"]["members"] == 2 and ensemble["cycles"] == 1
    c = saved["conclusions"]
    reference = saved["runs"][0]["best_val_accuracy"]
    assert c["reference"] == "nesterov_b4" and c["target"] == pytest.approx(round(reference - 0.01, 4))
    assert c["lars"]["gap_to_reference"]["8"] == pytest.approx(
        reference - saved["runs"][3]["best_val_accuracy"], abs=1e-4
    )
    assert c["powersgd_cost"]["nesterov_b8_powersgd4"] == pytest.approx(
        saved["runs"][1]["best_val_accuracy"] - saved["runs"][-1]["best_val_accuracy"], abs=1e-4
    )
    assert all(r["epochs_to_target"] is None or r["epochs_to_target"] <= 1.0 for r in saved["runs"])
    again = study.main(args)  # every run is finished: reused, not retrained
    assert [r["wall_s"] for r in again["runs"]] == [r["wall_s"] for r in result["runs"]]
    # --only trains (here: reuses) just the named runs and writes no report; an unknown name lists the runs
    (tmp_path / "study.json").unlink()
    assert study.main(args + ["--only", "lars_b8"]) is None and not (tmp_path / "study.json").exists()
    with pytest.raises(SystemExit, match="nesterov_b4, nesterov_b8"):
        study.main(args + ["--only", "lars_b16"])


def test_replicas_train_again_with_other_seeds_and_the_conclusions_use_the_means(store, tmp_path):
    import study_large_batch as study

    args = [
        "--out",
        str(tmp_path),
        "--store",
        store,
        "--epochs",
        "1",
        "--warmup-epochs",
        "0.5",
        "--base-batch",
        "4",
        "--multipliers",
        "1,2",
        "--recipes",
        "nesterov",
        "--cycles",
        "0",
        "--powersgd",
        "",
        "--widths",
        "2,2,2,4,4,4,4",
        "--size",
        "128",
        "--merge-pool",
        "2",
        "--lr",
        "nesterov=0.05",
        "--seed",
        "3",
        "--ramp",
        "",
        "--replicas",
        "5",
        "--replicate",
        "nesterov_b4",
    ]
    saved = study.main(args)
    runs = {r["name"]: r for r in saved["runs"]}
    assert list(runs) == ["nesterov_b4", "nesterov_b8", "nesterov_b4_seed5"]
    assert [runs[n]["seed"] for n in runs] == [3, 3, 5] and runs["nesterov_b4_seed5"]["group"] == "nesterov_b4"
    assert runs["nesterov_b4"]["train_loss"] != runs["nesterov_b4_seed5"]["train_loss"]  # another initialisation
    base = next(g for g in saved["groups"] if g["name"] == "nesterov_b4")
    pair = [runs["nesterov_b4"]["best_val_accuracy"], runs["nesterov_b4_seed5"]["best_val_accuracy"]]
    assert base["seeds"] == [3, 5] and base["best_val_accuracy_per_seed"] == pair
    assert base["best_val_accuracy"] == pytest.approx(np.mean(pair))
    assert base["best_val_accuracy_sd"] == pytest.approx(np.std(pair, ddof=1))
    assert f"| nesterov_b4 | 4 | 0.05 | 10 | 2 | {100 * np.mean(pair):.1f}%, " in (tmp_path / "study.md").read_text()
    c = saved["conclusions"]
    assert c["reference_best"] == pytest.approx(np.mean(pair)) and c["nesterov"]["seeds"] == {4: 2, 8: 1}
    assert c["nesterov"]["gap_to_reference"][8] == pytest.approx(
        np.mean(pair) - runs["nesterov_b8"]["best_val_accuracy"], abs=1e-4
    )
    with pytest.raises(SystemExit, match="nesterov_b4, nesterov_b8"):
        study.main(args[:-1] + ["nesterov_b16"])
    with pytest.raises(SystemExit, match="--seed"):
        study.main(args[:-3] + ["3", "--replicate", "nesterov_b4"])


def test_a_growing_batch_run_is_compared_with_the_base_batch(store, tmp_path):
    """--ramp: a run whose global batch grows (train.batch_schedule) from the base batch, with its gaps."""
    import study_large_batch as study

    args = [
        "--out",
        str(tmp_path),
        "--store",
        store,
        "--epochs",
        "2",
        "--warmup-epochs",
        "0.5",
        "--base-batch",
        "4",
        "--multipliers",
        "1",
        "--recipes",
        "nesterov",
        "--cycles",
        "0",
        "--powersgd",
        "",
        "--widths",
        "2,2,2,4,4,4,4",
        "--size",
        "128",
        "--merge-pool",
        "2",
        "--lr",
        "nesterov=0.05",
        "--ramp",
        "nesterov:0=4,1=8",
    ]
    saved = study.main(args)
    base, ramp = saved["runs"]
    assert ramp["name"] == "nesterov_b8_ramp" and ramp["batch_schedule"] == [[0, 4], [1, 8]]
    assert ramp["steps"] == base["steps"] // 2 + base["steps"] // 4  # one epoch at 4 images, one at 8
    assert ramp["val_epoch"] == base["val_epoch"] == [1.0, 2.0]
    c = saved["conclusions"]["ramp"]["nesterov_b8_ramp"]
    assert c["gap_to_own_base"] == pytest.approx(base["best_val_accuracy"] - ramp["best_val_accuracy"], abs=1e-4)
    assert c["within_1_point_of_own_base"] == (c["gap_to_own_base"] <= 0.01)
    assert "nesterov" not in saved["conclusions"] or 8 not in saved["conclusions"]["nesterov"]["gap_to_reference"]
    assert "| nesterov_b8_ramp | 4 (epoch 0) -> 8 (epoch 1) |" in (tmp_path / "study.md").read_text()
    with pytest.raises(SystemExit, match="must start at the base batch"):
        study.main(args[:-1] + ["nesterov:0=8,1=16"])
    with pytest.raises(SystemExit, match="RECIPE:EPOCH=BATCH"):
        study.main(args[:-1] + ["nesterov:0-4"])
    fresh = ["--out", str(tmp_path / "fresh")] + args[2:-1]
    with pytest.raises(SystemExit, match="start epochs must increase"):
        study.main(fresh + ["nesterov:0=4,1=8,1=16"])
    assert not (tmp_path / "fresh" / "runs").exists()  # checked before any run trains
    with pytest.raises(SystemExit, match="not before the last epoch"):
        study.main(args[:-1] + ["nesterov:0=4,2=8"])


def test_merged_replicas_average_the_validation_curves():
    import study_large_batch as study

    def row(name, seed, acc):
        return dict(
            name=name + (f"_seed{seed}" if seed else ""),
            group=name,
            seed=seed,
            recipe="adamw",
            global_batch=16,
            multiplier=1.0,
            cycles=0,
            comm="",
            peak_lr=0.002,
            steps=10,
            val_epoch=[1.0, 2.0],
            val_accuracy=acc,
            best_val_accuracy=max(acc),
            final=dict(image_accuracy=acc[-1], treatment_accuracy=1.0),
        )

    (merged,) = study.merge_seeds([row("adamw_b16", 0, [0.5, 0.7]), row("adamw_b16", 1, [0.6, 0.6])])
    assert merged["val_accuracy"] == pytest.approx([0.55, 0.65]) and merged["best_val_accuracy"] == pytest.approx(0.65)
    assert study.epochs_to(merged, 0.6) == 2.0  # read on the mean curve: one seed alone reaches 0.6 at epoch 1
    assert merged["final_image_accuracy"] == pytest.approx(0.65)
    late = row("adamw_b16", 2, [0.5, 0.7])
    late["val_epoch"] = [1.0, 3.0]
    with pytest.raises(SystemExit, match="adamw_b16_seed2"):
        study.merge_seeds([row("adamw_b16", 0, [0.5, 0.7]), late])


def test_multipliers_for_every_recipe_or_per_recipe():
    import study_large_batch as study

    assert study.multipliers("1,4,16", "lars") == [1, 4, 16]
    assert study.multipliers("nesterov=1,4,16;lars=1,16", "lars") == [1, 16]
    with pytest.raises(SystemExit, match="adamw"):
        study.multipliers("nesterov=1,4,16;lars=1,16", "adamw")


def test_per_recipe_options_reach_the_config():
    import study_large_batch as study

    a = study.parse_args(["--out", "x", "--grad-clip", "nesterov=0.5", "--size", "64", "--merge-pool", "1"])
    nesterov, lars = study.make_config(a, "s", "nesterov", 64), study.make_config(a, "s", "lars", 64)
    assert nesterov.optim.grad_clip == 0.5 and lars.optim.grad_clip == 0.0
    assert nesterov.model.merge_pool == 1 and tuple(nesterov.model.input_shape) == (64, 64, 3)
    assert study.per_recipe("nesterov=0.03,lars=0.015", "lars", None) == "0.015"
    # --set: config overrides for every run, after the recipe's own settings
    a = study.parse_args(["--out", "x", "--set", "optim.b2=0.984", "--set", "train.keep_checkpoints=50"])
    adamw = study.make_config(a, "s", "adamw", 256)
    assert adamw.optim.b2 == 0.984 and adamw.train.keep_checkpoints == 50 and adamw.optim.name == "adamw"
    with pytest.raises(ValueError, match="unknown config key 'optim.b22'"):
        study.make_config(study.parse_args(["--out", "x", "--set", "optim.b22=1"]), "s", "adamw", 256)


def _study_json(tmp_path, epochs_to_target):
    def curve(e):  # validation accuracy 0.5 until epoch e (or always), then 0.8
        return dict(
            val_epoch=[1.0 * k for k in range(1, 21)],
            val_accuracy=[0.8 if e is not None and k >= e else 0.5 for k in range(1, 21)],
        )

    runs = [
        dict(
            name=f"nesterov_b{b}",
            recipe="nesterov",
            global_batch=b,
            cycles=0,
            comm="",
            best_val_accuracy=acc,
            **curve(e),
        )
        for b, acc, e in zip((16, 64, 256), (0.80, 0.80, 0.5), epochs_to_target)
    ]
    runs.append(
        dict(name="adamw_b16", recipe="adamw", global_batch=16, cycles=0, comm="", best_val_accuracy=0.5, **curve(None))
    )
    study = dict(
        runs=runs,
        conclusions=dict(
            reference="nesterov_b16",
            target=0.79,
            nesterov=dict(within_1_point=[16, 64, 256]),
            adamw=dict(within_1_point=[]),
        ),
    )
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study))
    return path


def test_time_to_accuracy_is_measured_epochs_times_projected_throughput(tmp_path):
    import time_to_accuracy as tta

    path = _study_json(tmp_path, (10.0, 12.0, None))
    result = tta.main(
        [
            "--study",
            str(path),
            "--node-batch",
            "32",
            "--images",
            "1000",
            "--node-image-s",
            "0.1",
            "--scheme",
            "allreduce",
        ]
    )
    assert result["recipe"] == "nesterov"  # the one within 1 point at the largest batch
    rows = {r["global_batch"]: r for r in result["rows"]}
    assert (rows[16]["nodes"], rows[16]["images_per_node"]) == (1, 16)
    assert (rows[64]["nodes"], rows[64]["images_per_node"]) == (2, 32)
    assert (rows[256]["nodes"], rows[256]["images_per_node"]) == (8, 32)
    assert rows[16]["images_per_s"] == pytest.approx(10.0)  # one node: no communication, 1 / 0.1 s per image
    assert rows[64]["images_per_s"] < 2 * 10.0  # two nodes pay for the allreduce
    for r in rows.values():
        if r["epochs_to_target"] is not None:
            assert r["hours_to_target"] == pytest.approx(r["epochs_to_target"] * 1000 / r["images_per_s"] / 3600)
    assert rows[256]["hours_to_target"] is None and rows[256]["speedup"] is None  # not reached: no time
    assert rows[16]["epochs_to_target"] == 10.0 and rows[64]["epochs_to_target"] == 12.0
    assert rows[64]["speedup"] == pytest.approx(rows[16]["hours_to_target"] / rows[64]["hours_to_target"])
    # a lower target is reached sooner (here at once); "own" is the recipe's base best minus 1 point
    low = tta.main(["--study", str(path), "--target", "0.45"])
    assert [r["epochs_to_target"] for r in low["rows"]] == [1.0, 1.0, 1.0]
    assert tta.main(["--study", str(path), "--target", "own"])["target"] == pytest.approx(0.79)
    with pytest.raises(SystemExit, match="--target"):
        tta.main(["--study", str(path), "--target", "soon"])
    with pytest.raises(SystemExit, match="lars"):
        tta.main(["--study", str(path), "--recipe", "lars"])
    # a study with replicas: its merged runs ("groups", mean curves) are the ones used
    study = json.loads(path.read_text())
    study["groups"] = [dict(r, val_accuracy=[0.8] * 20) for r in study["runs"]]
    path.write_text(json.dumps(study))
    assert [r["epochs_to_target"] for r in tta.main(["--study", str(path)])["rows"]] == [1.0, 1.0, 1.0]
    with pytest.raises(SystemExit, match="no study JSON"):
        tta.main(["--study", str(tmp_path / "missing.json")])


def test_time_to_accuracy_of_a_growing_batch_sums_its_phases(tmp_path):
    """A --ramp run trains on its last batch's nodes throughout: each phase's epochs before the target at that
    phase's images per node, whose throughput is the constant run's on the same nodes."""
    import time_to_accuracy as tta

    path = _study_json(tmp_path, (10.0, 12.0, None))
    study = json.loads(path.read_text())
    ramp = dict(
        name="nesterov_b256_ramp",
        recipe="nesterov",
        global_batch=256,
        cycles=0,
        comm="",
        batch_schedule=[[0, 16], [10, 64], [20, 256]],
        best_val_accuracy=0.8,
        val_epoch=[1.0 * k for k in range(1, 21)],
        val_accuracy=[0.8 if k >= 15 else 0.5 for k in range(1, 21)],
    )
    study["runs"].append(ramp)
    path.write_text(json.dumps(study))
    common = ["--study", str(path), "--images", "1000", "--node-image-s", "0.1", "--scheme", "allreduce"]
    rows = {r["run"]: r for r in tta.main(common + ["--node-batch", "32"])["rows"]}
    assert "nesterov_b256_ramp" not in [r["run"] for r in rows.values() if r["efficiency"] is not None]
    r = rows["nesterov_b256_ramp"]
    assert r["nodes"] == 8 and r["images_per_node"] == "2 -> 8 -> 32" and r["epochs_to_target"] == 15.0
    assert [p["epochs_to_target"] for p in r["phases"]] == [10.0, 5.0, 0.0]
    # the same 8 nodes at 2 and 8 images each: the constant runs at 16 (--node-batch 2) and 64 (--node-batch 8)
    at2 = {x["global_batch"]: x for x in tta.main(common + ["--node-batch", "2"])["rows"] if x["efficiency"]}
    at8 = {x["global_batch"]: x for x in tta.main(common + ["--node-batch", "8"])["rows"] if x["efficiency"]}
    assert at2[16]["nodes"] == at8[64]["nodes"] == 8
    assert r["hours_to_target"] == pytest.approx(
        (10 * 1000 / at2[16]["images_per_s"] + 5 * 1000 / at8[64]["images_per_s"]) / 3600
    )
    assert r["speedup"] == pytest.approx(rows["nesterov_b16"]["hours_to_target"] / r["hours_to_target"])
