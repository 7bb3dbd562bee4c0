"""Treatment-level accuracy at every evaluation, when the validation set holds whole treatments."""

import json

import jax
import numpy as np
from test_train import TINY

from mcnn_jax.config import load_config
from mcnn_jax.data import open_store
from mcnn_jax.evaluation.evaluate import whole_treatments
from mcnn_jax.evaluation.profiles import treatment_accuracy
from mcnn_jax.train import train_and_evaluate


def test_whole_treatments_only_for_whole_treatments(store):
    s = open_store(store)
    compound = np.asarray(s.metadata["compound"])
    held = sorted(set(compound) - {"DMSO"})[0]
    idx = np.flatnonzero(compound == held)
    compounds, concentrations = whole_treatments(s, idx)
    assert set(compounds) == {held} and len(concentrations) == len(idx)
    assert whole_treatments(s, idx[:-1]) is None  # one image of a treatment left out: not whole


def test_treatment_accuracy_in_metrics_with_a_held_out_compound(store, tmp_path):
    s = open_store(store)
    held = sorted(set(s.metadata["compound"]) - {"DMSO"})[0]
    cfg = load_config(TINY, [f"data.store={store}", "data.split=compound", f"data.holdout_compound={held}"])
    train_and_evaluate(cfg, tmp_path)
    val = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"]
    assert val and all(0.0 <= r["treatment_accuracy"] <= 1.0 and r["treatments"] >= 1 for r in val)
    # the same number from the saved model's probabilities, computed independently
    from mcnn_jax.evaluation.run import load_model

    model, params, _ = load_model(tmp_path, "latest")
    idx = np.flatnonzero(np.asarray(s.metadata["compound"]) == held)
    images = s.read(list(idx)).astype(np.float32) / np.iinfo(s.read([0]).dtype).max
    probs = jax.nn.softmax(model.apply({"params": params}, images), -1)
    ref = treatment_accuracy(np.asarray(probs), np.asarray(s.labels)[idx], *whole_treatments(s, idx))
    assert val[-1]["treatment_accuracy"] == ref["treatment_accuracy"]
    assert val[-1]["treatments"] == ref["treatments"]


def test_no_treatment_accuracy_on_a_random_split(store, tmp_path):
    train_and_evaluate(load_config(TINY, [f"data.store={store}"]), tmp_path)
    val = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("treatment_accuracy" not in r for r in val if r["split"] == "val")
