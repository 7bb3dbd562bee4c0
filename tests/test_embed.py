"""Embeddings and predictions of a trained model: the feature function against the model's own layers, the
mcnn-embed and mcnn-eval --predictions tables (columns, rows, values), atomic writes, a store without
compounds."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pandas as pd
import pytest

from mcnn_jax import MCNN
from mcnn_jax.cli.embed import main as embed_cli
from mcnn_jax.cli.evaluate import main as eval_cli
from mcnn_jax.config import load_config
from mcnn_jax.evaluation import embed as E
from mcnn_jax.evaluation import evaluate
from mcnn_jax.evaluation.run import load_model
from mcnn_jax.runtime import enable_compilation_cache

enable_compilation_cache()
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
META = [
    "Metadata_StoreIndex",
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_Compound",
    "Metadata_Concentration",
    "Metadata_MoA",
    "Metadata_Label",
]


@pytest.mark.parametrize("impl", ["xla", "native"])
def test_features_are_the_models_layers(impl):
    model = MCNN(num_classes=4, widths=(2, 2, 2, 4, 4, 4, 4), merge_width=16, head_width=8, impl=impl)
    x = jax.random.uniform(jax.random.key(1), (3, 128, 256, 3))
    params = model.init(jax.random.key(0), x)["params"]
    logits, state = model.apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    hidden = E.features(model, params, x)
    np.testing.assert_allclose(hidden, jax.nn.relu(inter["hidden"]["__call__"][0]), rtol=1e-6)
    assert hidden.shape == (3, 8) and (hidden >= 0).all()
    # the output layer is a linear map of these features
    np.testing.assert_allclose(
        hidden @ params["logits"]["kernel"] + params["logits"]["bias"], logits, rtol=1e-4, atol=1e-5
    )
    merge = E.features(model, params, x, layer="merge")
    pooled = nn.max_pool(jax.nn.relu(inter["merge"]["__call__"][0]), (2, 2), strides=(2, 2))  # [3, 1, 2, 16]
    np.testing.assert_allclose(merge, pooled.mean(axis=(1, 2)), rtol=1e-6)
    # ... and the pooled merge map (before averaging) is what the hidden layer reads
    flat = pooled.reshape(3, -1)
    np.testing.assert_allclose(
        jax.nn.relu(flat @ params["hidden"]["kernel"] + params["hidden"]["bias"]), hidden, rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="layer must be one of"):
        E.features(model, params, x, layer="conv")


@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    from mcnn_jax.train import train_and_evaluate

    wd = tmp_path_factory.mktemp("embed_run")
    train_and_evaluate(load_config(TINY, [f"data.store={store}", "train.max_steps=2"]), wd)
    return wd


def test_embedding_tables(run, store, tmp_path, capsys):
    from mcnn_jax.data import open_store, to_float

    st = open_store(store)
    embed_cli(["--workdir", str(run), "--out", str(tmp_path / "emb.parquet"), "--batch", "5"])
    assert "wrote 48 rows of hidden features" in capsys.readouterr().out
    df = pd.read_parquet(tmp_path / "emb.parquet")
    feats = [c for c in df.columns if c.startswith("hidden_")]
    assert list(df.columns) == META + feats and len(feats) == 16 and len(df) == st.num_images == 48
    assert list(df.Metadata_StoreIndex) == list(range(48))
    assert list(df.Metadata_MoA) == [st.class_names[i] for i in st.labels]
    assert set(df.Metadata_Plate) == set(st.metadata["plate"]) and df.Metadata_Compound.str.len().min() > 0
    model, params, _ = load_model(run)
    rows = [0, 7, 47]
    np.testing.assert_allclose(
        df.loc[rows, feats].to_numpy(), E.features(model, params, to_float(st.read(rows))), rtol=1e-5, atol=1e-6
    )
    embed_cli(["--workdir", str(run), "--out", str(tmp_path / "merge.csv"), "--layer", "merge", "--split", "val"])
    m = pd.read_csv(tmp_path / "merge.csv")
    assert len([c for c in m.columns if c.startswith("merge_")]) == 16
    from mcnn_jax.data import split_indices

    assert list(m.Metadata_StoreIndex) == list(split_indices(st, load_config(TINY).data)[1])
    assert not list(tmp_path.glob(".*.tmp"))


def test_predictions_table_and_treatment_accuracy(run, tmp_path, capsys):
    ref = evaluate.evaluate_checkpoint(run, split="all")
    eval_cli(["--workdir", str(run), "--split", "all", "--predictions", str(tmp_path / "pred.parquet")])
    out = capsys.readouterr().out
    df = pd.read_parquet(tmp_path / "pred.parquet")
    probs = [c for c in df.columns if c.startswith("P_")]
    assert probs == [f"P_{n}" for n in ref["class_names"]] and len(df) == ref["count"] == 48
    for c in META + ["Metadata_Predicted_MoA", "Metadata_Predicted_Label"]:
        assert c in df.columns, c
    np.testing.assert_allclose(df[probs].sum(1), 1.0, rtol=1e-5)
    assert (df[probs].to_numpy().argmax(1) == df.Metadata_Predicted_Label).all()
    acc = (df.Metadata_MoA == df.Metadata_Predicted_MoA).mean()
    assert acc == pytest.approx(ref["accuracy"]) and f"accuracy {ref['accuracy']:.4f}" in out
    assert "treatment-level accuracy" in out and "per compound:" in out
    for compound in set(df.Metadata_Compound):
        assert compound in out


def test_table_writer_is_atomic(tmp_path):
    w = E.TableWriter(tmp_path / "t.parquet")
    w.write(pd.DataFrame({"a": [1, 2]}))
    assert not (tmp_path / "t.parquet").exists()
    w.abort()
    assert not list(tmp_path.iterdir())
    w = E.TableWriter(tmp_path / "t.csv")
    w.write(pd.DataFrame({"a": [1, 2]}))
    w.write(pd.DataFrame({"a": [3]}))
    w.close()
    assert list(pd.read_csv(tmp_path / "t.csv").a) == [1, 2, 3] and len(list(tmp_path.iterdir())) == 1


def test_store_without_compounds(run, store, tmp_path, capsys):
    """A folder-style store (no compound metadata): predictions work, treatment accuracy says what is missing."""
    from mcnn_jax.data import open_store
    from mcnn_jax.data.store import StoreWriter

    st = open_store(store)
    w = StoreWriter(tmp_path / "folder_store", 6, st.image_shape, "uint16")
    for i in range(6):
        w.write(i, st.read([i])[0])
    w.finish(st.labels[:6], st.class_names, {"class": [st.class_names[i] for i in st.labels[:6]]}, st.channels)
    eval_cli(
        [
            "--workdir",
            str(run),
            "--store",
            str(tmp_path / "folder_store"),
            "--split",
            "all",
            "--predictions",
            str(tmp_path / "p.csv"),
        ]
    )
    out = capsys.readouterr().out
    assert "the store records no compounds (Metadata_Compound is missing" in out
    eval_cli(["--workdir", str(run), "--split", "all", "--predictions", str(tmp_path / "all.csv"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["count"] == 48 and 0 <= doc["treatment_accuracy"] <= 1 and doc["treatments"] > 0
    df = pd.read_csv(tmp_path / "p.csv")
    assert len(df) == 6 and "Metadata_Compound" not in df.columns and "Metadata_Predicted_MoA" in df.columns


def test_snapshots_of_a_run_without_cycles_is_a_clear_error(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        embed_cli(["--workdir", str(run), "--checkpoint", "snapshots", "--out", str(tmp_path / "e.csv")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no snapshot checkpoint in" in err and "optim.cycles > 0" in err
    assert not list(tmp_path.iterdir())
