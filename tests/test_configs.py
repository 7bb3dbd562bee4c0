"""Every config loads, is locked, names the command that runs it, and the published recipe is what it says."""

from pathlib import Path

import pytest

from mcnn_jax.config import apply_overrides, base_config, config_module, load_config, published_recipe
from mcnn_jax.data.montage import parse_grid
from mcnn_jax.model.mcnn import from_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_locked_with_its_command(path):
    config = load_config(str(path))
    assert f"mcnn-train --config configs/{path.name}" in path.read_text().split('"""')[1]
    with pytest.raises(AttributeError):
        config.train.not_a_key = 1
    h, w, c = config.model.input_shape
    from_config(config.model)  # builds
    if config.data.synthetic.enabled:  # the fields, or with data.montage their whole-well montages
        rows, cols = parse_grid(config.data.montage.grid) if config.data.montage.grid else (1, 1)
        assert (rows * config.data.synthetic.height, cols * config.data.synthetic.width) == (h, w)


def test_published_recipe_preset():
    c = load_config("bbbc021")
    assert (c.optim.name, c.optim.momentum, c.optim.nesterov) == ("nesterov", 0.9, True)
    assert (c.optim.warmup_init_lr, c.optim.base_lr, c.optim.warmup_epochs) == (0.001, 0.008, 5.0)
    assert (c.optim.decay, c.optim.end_lr, c.optim.label_smoothing, c.optim.weight_decay) == ("linear", 1e-4, 0.1, 5e-5)
    assert tuple(c.model.input_shape) == (1024, 1280, 3)
    assert published_recipe(base_config()).optim.to_dict() == c.optim.to_dict()


def test_overrides_are_typed():
    c = load_config(
        "tiny",
        [
            "optim.name=lars",
            "train.global_batch=16",
            "optim.base_lr=1",
            "model.widths=(1,2,3,4,5,6,7)",
            "data.augment.flips=false",
        ],
    )
    assert c.optim.name == "lars" and c.train.global_batch == 16 and c.optim.base_lr == 1.0
    assert tuple(c.model.widths) == (1, 2, 3, 4, 5, 6, 7) and c.data.augment.flips is False
    with pytest.raises(ValueError, match="section"):
        load_config("tiny", ["optim=1"])
    with pytest.raises(FileNotFoundError, match="the project's configs are"):
        load_config("nope")


def test_overrides_on_a_built_config_read_as_the_flags_do():
    c = apply_overrides(
        base_config(),
        [
            "optim.b2=0.984",
            "train.global_batch=16",
            "optim.base_lr=1",
            "model.widths=(1,2,3,4,5,6,7)",
            "data.augment.flips=false",
            "optim.name=lars",
        ],
    )
    assert c.optim.b2 == 0.984 and c.train.global_batch == 16 and c.optim.base_lr == 1.0
    assert tuple(c.model.widths) == (1, 2, 3, 4, 5, 6, 7) and c.data.augment.flips is False and c.optim.name == "lars"
    with pytest.raises(ValueError, match="unknown config key 'optim.b3'.*Did you mean optim.b2"):
        apply_overrides(base_config(), ["optim.b3=0.9"])
    with pytest.raises(ValueError, match="'optim' is a section"):
        apply_overrides(base_config(), ["optim=1"])
    with pytest.raises(ValueError, match="'optim.b2' takes a float .* got 'fast'"):
        apply_overrides(base_config(), ["optim.b2=fast"])
    with pytest.raises(ValueError, match="must be KEY=VALUE"):
        apply_overrides(base_config(), ["optim.b2"])


@pytest.mark.parametrize("name,multiplier,ranks", [("bbbc021_large_batch", 16, 8), ("bbbc021_batch64", 4, 4)])
def test_large_batch_configs_are_the_study_recipe(name, multiplier, ranks):
    """configs/bbbc021_large_batch.py (16x) and bbbc021_batch64.py (4x) are the large-batch study's AdamW recipe
    (its defaults) at that multiple of its base batch."""
    import sys

    from mcnn_jax.optim import make_schedule, scaled_lr

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import study_large_batch as study

    c = load_config(name)
    a = study.parse_args(["--out", "x"])
    ref = study.make_config(a, "s", "adamw", multiplier * a.base_batch)
    assert c.train.global_batch == multiplier * a.base_batch
    for key in (
        "name",
        "lr_scaling",
        "base_lr",
        "base_batch",
        "warmup_epochs",
        "decay",
        "epochs",
        "b1",
        "b2",
        "warmup_init_lr",
        "end_lr",
        "label_smoothing",
        "weight_decay",
    ):
        assert (
            c.optim[key] == pytest.approx(ref.optim[key])
            if isinstance(c.optim[key], float)
            else c.optim[key] == ref.optim[key]
        ), key
    peak = scaled_lr(c.optim.base_lr, c.train.global_batch, c.optim.base_batch, c.optim.lr_scaling)
    assert peak == pytest.approx(0.002 * multiplier)  # the linear rule
    schedule = make_schedule(c.optim, 12, c.train.global_batch)
    assert float(schedule(60)) == pytest.approx(peak, rel=1e-5)  # the end of the 5-epoch warmup
    assert (c.train.global_batch // ranks) % c.train.microbatch == 0  # one rank per node, in micro-batches
    with pytest.raises(FileNotFoundError, match="nope.py"):
        config_module(Path("configs/nope.py"))


def test_the_growing_batch_config_is_the_study_ramp():
    """configs/bbbc021_growing_batch.py is the large-batch study's --ramp run (its defaults) on 16 nodes."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import study_large_batch as study

    from mcnn_jax.optim import batch_schedule

    c = load_config("bbbc021_growing_batch")
    a = study.parse_args(["--out", "x"])
    ref = study.make_config(a, "s", "adamw", 256, ramp=True)
    assert tuple(map(tuple, c.train.batch_schedule)) == tuple(map(tuple, ref.train.batch_schedule))
    assert c.train.global_batch == ref.train.global_batch == 256
    for key in (
        "name",
        "lr_scaling",
        "base_lr",
        "base_batch",
        "warmup_epochs",
        "decay",
        "epochs",
        "b1",
        "b2",
        "warmup_init_lr",
        "end_lr",
        "label_smoothing",
        "weight_decay",
    ):
        assert (
            c.optim[key] == pytest.approx(ref.optim[key])
            if isinstance(c.optim[key], float)
            else c.optim[key] == ref.optim[key]
        ), key
    sched = batch_schedule.schedule_from_config(c, 3848)  # BBBC021's fields
    assert [p.global_batch % 16 for p in sched.phases] == [0, 0, 0]  # one rank on each of 16 nodes
    assert c.train.microbatch == 0


def test_a_stored_config_is_merged_onto_todays_defaults():
    """A run's config as stored (JSON: tuples as lists), from before some keys existed, reads back with today's
    defaults for them, so no reader needs a fallback of its own."""
    import json

    from mcnn_jax.checkpoint import config_to_json
    from mcnn_jax.config import restore_config

    default = next(p for p in CONFIGS if p.name == "default.py")
    c = load_config(str(default), ["train.batch_schedule=((0, 8), (2, 16))"])
    stored = json.loads(config_to_json(c))
    assert restore_config(stored).to_dict() == c.to_dict()
    del stored["optim"]["cycles"], stored["data"]["synthetic"]["difficulty"], stored["train"]["batch_schedule"]
    stored["optim"]["retired_key"] = 1  # a key a later version dropped: kept, not an error
    r = restore_config(stored)
    assert r.optim.cycles == 0 and r.data.synthetic.difficulty == 0.0 and r.train.batch_schedule == ()
    assert r.model.input_shape == (256, 256, 3) and isinstance(r.model.widths, tuple) and r.optim.retired_key == 1
    stored["model"]["remat"] = [True] * 7  # another type than today's default (a bool): the run's value is kept
    assert from_config(restore_config(stored).model, num_classes=4).remat == (True,) * 7
