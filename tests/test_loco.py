"""mcnn-loco: a three-compound leave-one-compound-out run of the tiny config with one interrupted fold that
resumes, the merged report against the folds' files, skipping finished folds, and bad input."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mcnn_jax.cli import loco as loco_cli
from mcnn_jax.config import load_config
from mcnn_jax.data import open_store
from mcnn_jax.evaluation import loco

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
HELD_OUT = ["cmpd01a", "cmpd02a", "cmpd03b"]


def mcnn_loco(workdir, store, *args):
    cmd = [
        sys.executable,
        "-m",
        "mcnn_jax.cli.loco",
        "--config",
        TINY,
        "--workdir",
        str(workdir),
        f"--config.data.store={store}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_three_compound_loco_with_an_interrupted_fold(store, tmp_path):
    from mcnn_jax.train import train_and_evaluate

    st = open_store(store)
    compounds = loco.fold_compounds(st)
    assert "DMSO" not in compounds and set(HELD_OUT) <= set(compounds)
    # an interrupted fold: its training stopped at step 1 of 2 (a checkpoint, no FOLD_COMPLETE marker)
    interrupted = loco.fold_dir(tmp_path, compounds, "cmpd02a")
    train_and_evaluate(
        load_config(
            TINY, [f"data.store={store}", "data.split=compound", "data.holdout_compound=cmpd02a", "train.max_steps=1"]
        ),
        interrupted,
    )
    first_s, attempts = loco.earlier_train_wall_s(interrupted)
    assert attempts == 1 and first_s > 0
    proc = mcnn_loco(tmp_path, store, "--compounds", ",".join(HELD_OUT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"fold {interrupted.name}: training with 'cmpd02a' held out (resuming)" in proc.stdout
    starts = {
        c: json.loads((loco.fold_dir(tmp_path, compounds, c) / "summary.json").read_text())["start_step"]
        for c in HELD_OUT
    }
    assert starts == {"cmpd01a": 0, "cmpd02a": 1, "cmpd03b": 0}
    done = {c: json.loads((loco.fold_dir(tmp_path, compounds, c) / loco.MARKER).read_text()) for c in HELD_OUT}
    assert {c: d["train_attempts"] for c, d in done.items()} == {"cmpd01a": 1, "cmpd02a": 2, "cmpd03b": 1}
    assert done["cmpd02a"]["train_wall_s"] > first_s  # the interrupted attempt's time is counted too
    assert all(d["checkpoint"] == "latest" and d["members"] == [d["step"]] == [2] for d in done.values())

    report = json.loads((tmp_path / "loco_report.json").read_text())
    comps = np.asarray(st.metadata["compound"])
    held = np.isin(comps, HELD_OUT)
    assert report["folds_finished"] == 3 and report["folds_missing"] == [] and report["images"] == held.sum()
    assert [f["compound"] for f in report["per_fold"]] == HELD_OUT
    conf = np.asarray(report["confusion"])
    assert conf.sum() == held.sum() and report["image_accuracy"] == pytest.approx(conf.trace() / conf.sum())
    assert (conf.sum(1) == np.bincount(st.labels[held], minlength=4)).all()
    preds = pd.read_parquet(tmp_path / "loco_predictions.parquet")
    assert sorted(preds.Metadata_StoreIndex) == list(np.flatnonzero(held))
    treatments = {(c, x) for c, x in zip(comps[held], np.asarray(st.metadata["concentration"])[held])}
    assert report["treatments"] == report["nsc"]["treatments"] == len(treatments)
    nn = pd.read_csv(tmp_path / "loco_neighbours.csv")
    assert set(nn.Metadata_Compound) == set(HELD_OUT) and (nn.Metadata_Compound != nn.neighbour_compound).all()
    for c in HELD_OUT:
        fold = loco.fold_dir(tmp_path, compounds, c)
        assert len(pd.read_parquet(fold / "embeddings.parquet")) == st.num_images
        assert set(pd.read_parquet(fold / "predictions.parquet").Metadata_Compound) == {c}
    assert "leave-one-compound-out: 3 of 3 folds finished" in proc.stdout and "NSCB" in proc.stdout

    markers = {c: (loco.fold_dir(tmp_path, compounds, c) / loco.MARKER).stat().st_mtime_ns for c in HELD_OUT}
    again = mcnn_loco(tmp_path, store, "--compounds", ",".join(HELD_OUT))
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 3
    assert markers == {c: (loco.fold_dir(tmp_path, compounds, c) / loco.MARKER).stat().st_mtime_ns for c in HELD_OUT}
    partial = mcnn_loco(tmp_path, store, "--report")  # every fold of the store: 3 of 6 finished
    assert partial.returncode == 0 and "3 of 6 folds finished (missing: cmpd01b, cmpd02b, cmpd03a)" in partial.stdout
    fold = loco.fold_dir(tmp_path, compounds, "cmpd01a")
    with pytest.raises(
        loco.LocoError,
        match=rf"fold {fold.name} \(held-out compound 'cmpd01a'\), --checkpoint "
        r"snapshots: no snapshot checkpoint in .*add --config.optim.cycles=N",
    ):
        loco.evaluate_fold(fold, store, "cmpd01a", checkpoint="snapshots")
    # a fold evaluated on another store (its recorded fingerprint differs) is refused by name
    doc = json.loads((fold / loco.MARKER).read_text())
    assert doc["store_fingerprint"] == loco.store_fingerprint(st)
    (fold / loco.MARKER).write_text(json.dumps(dict(doc, store_fingerprint="0" * 16)))
    with pytest.raises(loco.LocoError, match=rf"fold\(s\) {fold.name} were trained and evaluated on another store"):
        loco.merged_report(tmp_path, st, compounds, only=HELD_OUT)


def test_bad_input_names_what_is_missing(store, tmp_path):
    proc = mcnn_loco(tmp_path, store, "--compounds", "cmpd01a,nosuch")
    assert proc.returncode == 2 and "'nosuch' are not compounds of" in proc.stderr and "cmpd01b" in proc.stderr
    proc = mcnn_loco(tmp_path, store, "--fold", "99")
    assert proc.returncode == 2 and "--fold 99 is out of range" in proc.stderr
    proc = mcnn_loco(tmp_path, store, "--report")
    assert proc.returncode == 2 and "no finished fold" in proc.stderr
    proc = mcnn_loco(tmp_path, store, "--checkpoint", "snapshots")  # before any training
    assert proc.returncode == 2 and "only with optim.cycles > 0: add --config.optim.cycles=N" in proc.stderr
    assert not (tmp_path / "folds").exists()
    with pytest.raises(loco.LocoError, match="records no compounds"):
        loco.fold_compounds(SimpleNamespace(compounds=[], path="folder.store"))


def test_single_compound_classes():
    st = SimpleNamespace(
        metadata={"class": ["DMSO", "a", "a", "b", "b", "c"], "compound": ["DMSO", "x", "y", "z", "z", "w"]}
    )
    assert loco.single_compound_classes(st) == {"b": "z", "c": "w"}


def test_a_fold_stopped_by_a_signal_is_not_evaluated(tmp_path):
    """SIGTERM makes the trainer checkpoint and exit 0; its summary records it and the fold is not taken as trained."""
    fold = tmp_path / "00-x"
    fold.mkdir()
    with pytest.raises(loco.LocoError, match="no readable summary.json"):
        loco.check_trained(fold, "x")
    (fold / "summary.json").write_text(json.dumps(dict(final_step=3, total_steps=10, preempted_at_step=3)))
    with pytest.raises(loco.LocoError, match="stopped by a signal at step 3 of 10"):
        loco.check_trained(fold, "x")
    (fold / "summary.json").write_text(json.dumps(dict(final_step=10, total_steps=10)))
    loco.check_trained(fold, "x")


def test_best_is_refused(capsys):
    for which in ("best", "latest,best"):
        with pytest.raises(SystemExit) as exit_:
            loco_cli.parse_args(["--config", TINY, "--workdir", "w", "--checkpoint", which])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "--checkpoint best is refused" in err and "select on the test set" in err
    assert loco_cli.parse_args(["--config", TINY, "--workdir", "w"])[0].checkpoint == "latest"


def test_earlier_attempts_add_up(tmp_path):
    """Each training attempt appends to metrics.jsonl with its own wall clock; a killed one may cut a line."""
    records = [
        dict(split="train", step=1, wall=1.0),
        dict(split="val", step=1, wall=2.5),
        dict(split="train", step=2, wall=0.5),
        dict(split="train", step=3, wall=1.5),
    ]
    text = "\n".join(json.dumps(r) for r in records) + '\n{"split": "train", "wa'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert loco.earlier_train_wall_s(tmp_path) == (4.0, 2)
    assert loco.earlier_train_wall_s(tmp_path / "nothing") == (0.0, 0)


CYCLES = [
    "--config.train.max_steps=0",
    "--config.optim.epochs=1.0",
    "--config.optim.warmup_epochs=0.5",
    "--config.optim.cycles=2",
    "--config.optim.cycle_epochs=0.5",
    "--config.train.eval_every_epochs=100.0",
]


def test_a_fold_evaluated_by_its_collapsed_ensemble(store, tmp_path, capsys):
    """--checkpoint snapshots: the predictions are the mean of the members' probabilities (computed here member by
    member), the embeddings the members' features side by side; the steps are recorded; asked again with
    --checkpoint latest the finished fold is evaluated again, not trained again."""
    import jax

    from mcnn_jax.data import to_float
    from mcnn_jax.evaluation.embed import feature_names
    from mcnn_jax.evaluation.run import load_ensemble

    args = [
        "--config",
        TINY,
        "--workdir",
        str(tmp_path),
        f"--config.data.store={store}",
        "--compounds",
        "cmpd01a",
        *CYCLES,
    ]
    loco_cli.main([*args, "--checkpoint", "snapshots"])  # in this process, but for the fold's training
    assert "1 of 1 folds finished; evaluated checkpoint(s): snapshots" in capsys.readouterr().out
    st = open_store(store)
    fold = loco.fold_dir(tmp_path, loco.fold_compounds(st), "cmpd01a")
    model, members, metas = load_ensemble(fold, "snapshots")
    done = json.loads((fold / loco.MARKER).read_text())
    assert len(members) == 3 and done["checkpoint"] == "snapshots" and done["members"] == [m["step"] for m in metas]
    report = json.loads((tmp_path / "loco_report.json").read_text())
    assert report["checkpoint"] == ["snapshots"] and report["per_fold"][0]["members"] == done["members"]
    pred = pd.read_parquet(fold / "predictions.parquet")
    x = to_float(st.read(pred.Metadata_StoreIndex.to_numpy()))
    mean = np.mean([np.asarray(jax.nn.softmax(model.apply({"params": p}, x)), np.float64) for p in members], 0)
    np.testing.assert_allclose(pred[[f"P_{n}" for n in st.class_names]].to_numpy(), mean, rtol=0, atol=1e-6)
    assert (pred.Metadata_Predicted_Label.to_numpy() == mean.argmax(1)).all()
    emb = pd.read_parquet(fold / "embeddings.parquet")
    assert [c for c in emb.columns if not c.startswith("Metadata_")] == feature_names("hidden", 16, 3)

    loco_cli.main(args)
    again = capsys.readouterr().out
    assert "finished with --checkpoint snapshots, evaluated again with --checkpoint latest" in again
    assert "training with" not in again
    latest = json.loads((fold / loco.MARKER).read_text())
    assert latest["members"] == done["members"][-1:] and latest["train_wall_s"] == done["train_wall_s"]
    emb = pd.read_parquet(fold / "embeddings.parquet")
    assert [c for c in emb.columns if not c.startswith("Metadata_")] == feature_names("hidden", 16)


def test_a_fold_trains_on_the_trainers_store(tmp_path):
    """mcnn-loco prepares the config's store with the trainer's function: the synthetic screen's camera and
    difficulty reach the folds (a copy of the preparation once dropped them)."""
    from mcnn_jax.data.prepare import prepare_store
    from mcnn_jax.parallel.world import World

    cfg = load_config(
        TINY,
        [
            "data.synthetic.num_images=24",
            "data.synthetic.background=offset",
            "data.synthetic.saturation=3000",
            "data.synthetic.bits=12",
            "data.synthetic.difficulty=0.5",
        ],
    )
    fold_store = loco.open_loco_store(cfg, tmp_path / "loco")
    train_store = prepare_store(cfg, tmp_path / "train", World())
    info = fold_store.info["synthetic"]
    assert info == train_store.info["synthetic"]
    assert info["camera"] == {"background": "offset", "saturation": 3000, "bits": 12} and info["difficulty"] == 0.5
    idx = np.arange(fold_store.num_images)
    np.testing.assert_array_equal(fold_store.read(idx), train_store.read(idx))
    with pytest.raises(loco.LocoError, match="names no store"):
        loco.open_loco_store(load_config(TINY, ["data.synthetic.enabled=false"]), tmp_path / "none")
