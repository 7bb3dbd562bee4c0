"""The collapsed ensemble (issue 13): cosine-restart cycles after the main run keep a snapshot at the end of
each cycle; evaluating the snapshots averages their probabilities."""

import logging
from pathlib import Path

import jax
import numpy as np
import pytest

from mcnn_jax.checkpoint import Checkpointer
from mcnn_jax.cli.embed import main as embed_cli
from mcnn_jax.cli.evaluate import main as eval_cli
from mcnn_jax.config import load_config
from mcnn_jax.data import Reader, open_store, split_indices
from mcnn_jax.evaluation.evaluate import evaluate_checkpoint
from mcnn_jax.evaluation.run import load_ensemble
from mcnn_jax.optim import snapshot_steps, steps_per_epoch
from mcnn_jax.runtime import enable_compilation_cache
from mcnn_jax.train import train_and_evaluate

enable_compilation_cache()
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def cycled(store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cycled")
    config = load_config(
        TINY,
        [
            f"data.store={store}",
            "train.max_steps=0",
            "optim.epochs=1.0",
            "optim.warmup_epochs=0.5",
            "optim.cycles=2",
            "optim.cycle_epochs=0.5",
            "train.keep_checkpoints=1",
            "train.eval_every_epochs=100.0",
        ],
    )
    summary = train_and_evaluate(config, workdir)
    return workdir, config, summary


def test_cycles_keep_a_snapshot_at_the_end_of_each(store, cycled):
    workdir, config, summary = cycled
    train_idx, _ = split_indices(open_store(store), config.data)
    spe = steps_per_epoch(len(train_idx), config.train.global_batch)
    snapshots = snapshot_steps(config.optim, spe)
    assert len(snapshots) == 3 and summary["final_step"] == snapshots[-1]
    ckpt = Checkpointer(workdir, write=False)
    assert ckpt.resolve_members("snapshots") == snapshots  # kept although train.keep_checkpoints=1
    assert all(ckpt.meta(s)["val_accuracy"] is not None for s in snapshots)  # each snapshot was evaluated
    ckpt.close()


def test_ensemble_evaluation_is_the_mean_of_the_members_probabilities(store, cycled, capsys, caplog):
    workdir, config, _ = cycled
    result = evaluate_checkpoint(workdir, "snapshots", batch=4)
    model, members, metas = load_ensemble(workdir, "snapshots")
    assert result["members"] == [m["step"] for m in metas] and len(members) == 3
    st = open_store(store)
    _, val_idx = split_indices(st, config.data)
    reader = Reader(st, val_idx, 5, augment=None, train=False)
    probs, labels = [], []
    for _, batch in reader.iterate():
        keep = batch["mask"] > 0
        member_probs = [
            np.asarray(jax.nn.softmax(model.apply({"params": p}, batch["image"])), np.float64) for p in members
        ]
        probs.append(np.mean(member_probs, axis=0)[keep])
        labels.append(batch["label"][keep])
    reader.close()
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    assert result["count"] == len(labels) == len(val_idx)
    assert result["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert result["loss"] == pytest.approx(-np.log(probs[np.arange(len(labels)), labels]).mean(), rel=1e-5)
    confusion = np.zeros_like(np.asarray(result["confusion"]))
    np.add.at(confusion, (labels, probs.argmax(1)), 1)
    np.testing.assert_array_equal(result["confusion"], confusion)
    # members differ, so the ensemble is not one of them
    single = [evaluate_checkpoint(workdir, str(m["step"]), batch=4)["loss"] for m in metas]
    assert all(abs(s - result["loss"]) > 1e-6 for s in single)
    caplog.set_level(logging.INFO, logger="absl")
    eval_cli(["--workdir", str(workdir), "--checkpoint", ",".join(str(m["step"]) for m in metas)])
    assert "ensemble of 3 checkpoints" in capsys.readouterr().out
    # reading a finished run is quiet: no warning about the read-only checkpoint folder it asked for
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]


def test_embed_and_predictions_tables_of_an_ensemble(store, cycled, tmp_path, capsys):
    """mcnn-embed / mcnn-eval --predictions with --checkpoint snapshots: the members' features side by side, the
    mean of the members' probabilities, each against the members computed one by one."""
    import pandas as pd

    from mcnn_jax.data import to_float
    from mcnn_jax.evaluation import embed as E

    workdir, _, _ = cycled
    model, members, metas = load_ensemble(workdir, "snapshots")
    embed_cli(
        ["--workdir", str(workdir), "--checkpoint", "snapshots", "--out", str(tmp_path / "emb.parquet"), "--batch", "5"]
    )
    steps = ", ".join(str(m["step"]) for m in metas)
    assert f"wrote 48 rows of hidden features of 3 checkpoints (steps {steps})" in capsys.readouterr().out
    emb = pd.read_parquet(tmp_path / "emb.parquet")
    feats = [c for c in emb.columns if not c.startswith("Metadata_")]
    assert feats == E.feature_names("hidden", 16, 3) and feats[16] == "hidden_m1_00" and len(feats) == 3 * 16
    st = open_store(store)
    x = to_float(st.read(list(range(st.num_images))))
    np.testing.assert_allclose(
        emb[feats].to_numpy(), np.concatenate([E.features(model, p, x) for p in members], 1), rtol=1e-5, atol=1e-6
    )
    eval_cli(
        [
            "--workdir",
            str(workdir),
            "--checkpoint",
            "snapshots",
            "--split",
            "all",
            "--predictions",
            str(tmp_path / "pred.parquet"),
        ]
    )
    assert "ensemble of 3 checkpoints" in capsys.readouterr().out
    pred = pd.read_parquet(tmp_path / "pred.parquet")
    mean = np.mean([np.asarray(jax.nn.softmax(model.apply({"params": p}, x)), np.float64) for p in members], 0)
    np.testing.assert_allclose(pred[[f"P_{n}" for n in st.class_names]].to_numpy(), mean, rtol=0, atol=1e-6)
    assert (pred.Metadata_Predicted_Label.to_numpy() == mean.argmax(1)).all()
