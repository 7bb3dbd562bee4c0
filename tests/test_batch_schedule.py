"""train.batch_schedule: a global batch that grows during training. Steps, epochs, the reader's steps, the
learning rate (against the constant-batch runs), clear errors, and a run end to end that resumes bit for bit."""

import json
from pathlib import Path

import numpy as np
import pytest

from mcnn_jax import optim
from mcnn_jax.config import base_config, load_config
from mcnn_jax.optim import batch_schedule
from mcnn_jax.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def _config(spec, global_batch, **optim_keys):
    c = base_config()
    c.train.global_batch = global_batch
    c.train.batch_schedule = spec
    c.optim.update(optim_keys)
    return c


def test_phases_steps_epochs_and_reader_steps():
    sched = batch_schedule.schedule_from_config(_config(((0, 4), (2, 10), (3, 20)), 20, epochs=5.0), num_train=103)
    assert [(p.start_epoch, p.global_batch, p.steps_per_epoch, p.start_step) for p in sched.phases] == [
        (0, 4, 25, 0),
        (2, 10, 10, 50),
        (3, 20, 5, 60),
    ]
    assert [sched.index(s) for s in (0, 49, 50, 59, 60, 70)] == [0, 0, 1, 1, 2, 2]
    assert sched.epoch(25) == 1.0 and sched.epoch(55) == 2.5 and sched.epoch(70) == 5.0
    for s in range(71):
        assert sched.steps(sched.epoch(s)) == pytest.approx(s)
    # step 55 is position 5 of epoch 2 at batch 10: the reader at batch 10 reads its step 2 x 10 + 5
    assert sched.reader_step(55) == 25 and sched.reader_step(0) == 0 and sched.reader_step(60) == 15
    assert sched.total_steps(_config((), 20, epochs=5.0).optim) == 70
    assert sorted(sched.eval_steps(1.0, 70)) == [25, 50, 60, 65, 70]
    assert sorted(sched.eval_steps(2.0, 70)) == [50, 65, 70]


def test_a_constant_schedule_is_the_plain_run():
    c = _config((), 32, epochs=3.5, warmup_epochs=1.0, decay="cosine", cycles=2, cycle_epochs=0.5)
    sched = batch_schedule.schedule_from_config(c, num_train=330)
    assert sched.constant and sched.phases[0].steps_per_epoch == 10
    assert sched.total_steps(c.optim) == optim.total_steps(c.optim, 10)
    assert sched.snapshot_steps(c.optim) == optim.snapshot_steps(c.optim, 10)
    plain = optim.make_schedule(c.optim, 10, 32)
    assert [float(sched.lr_schedule(c.optim)(s)) for s in range(45)] == [float(plain(s)) for s in range(45)]
    assert sorted(sched.eval_steps(0.5, 45)) == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    # a one-entry schedule at train.global_batch is the same run
    same = batch_schedule.schedule_from_config(_config(((0, 32),), 32, epochs=3.5), num_train=330)
    assert same.phases == sched.phases


@pytest.mark.parametrize("decay", ["cosine", "linear", "step", "polynomial"])
def test_each_phase_follows_the_constant_run_at_its_batch(decay):
    """With the warmup starting and the decay ending at 0 (the values that do not scale with the batch), every
    phase's learning rate is the constant-batch run's at that batch and epoch (the linear rule)."""
    keys = dict(
        epochs=6.0,
        warmup_epochs=1.5,
        warmup_init_lr=0.0,
        end_lr=0.0,
        decay=decay,
        base_lr=0.01,
        base_batch=4,
        step_epochs=(3.0, 5.0),
        power=2.0,
    )
    c = _config(((0, 4), (2, 8), (4, 32)), 32, **keys)
    sched = batch_schedule.schedule_from_config(c, num_train=64)
    lr = sched.lr_schedule(c.optim)
    ends = [q.start_step for q in sched.phases[1:]] + [sched.total_steps(c.optim)]
    assert ends == [32, 48, 52]
    for p, end in zip(sched.phases, ends):
        plain = optim.make_schedule(c.optim, p.steps_per_epoch, p.global_batch)
        for s in range(p.start_step, end):
            constant_step = round(sched.epoch(s) * p.steps_per_epoch)
            assert float(lr(s)) == pytest.approx(float(plain(constant_step)), rel=1e-5, abs=1e-9), (p, s)
    # the learning rate jumps up with the batch at each phase boundary (the linear rule)
    for p in sched.phases[1:]:
        assert float(lr(p.start_step)) > 1.5 * float(lr(p.start_step - 1)), p


def test_boundaries_are_crossed_at_the_same_step_as_at_a_constant_batch():
    """The last phase's learning rates are the final batch's schedule at the same steps, exactly (shifted by the
    earlier phases' steps): a step decay between whole epochs (here at the final batch's step 26) is crossed at
    the same step, not one later by float rounding."""
    import jax
    import jax.numpy as jnp

    c = _config(
        ((0, 16), (1, 64)),
        64,
        epochs=4.0,
        warmup_epochs=0.0,
        decay="step",
        step_epochs=(26 / 12,),
        step_gamma=0.1,
        base_lr=0.01,
        base_batch=64,
    )
    sched = batch_schedule.schedule_from_config(c, num_train=768)  # 48 then 12 steps per epoch
    final = optim.make_schedule(c.optim, 12, 64)
    lr = jax.jit(jax.vmap(sched.lr_schedule(c.optim)))
    last = np.arange(sched.phases[1].start_step, sched.total_steps(c.optim))
    assert sched.shift == 36 and len(last) == 36
    assert np.array_equal(np.asarray(lr(jnp.asarray(last))), np.asarray(jax.vmap(final)(jnp.asarray(last - 36))))
    assert float(lr(jnp.asarray([62]))[0]) == pytest.approx(0.001) and float(lr(jnp.asarray([61]))[0]) == pytest.approx(
        0.01
    )


def test_a_growing_batch_with_cycles_snapshots_at_the_cycle_ends():
    """optim.cycles after a growing batch: each snapshot is taken after the last step of its cycle (at end_lr),
    and the next step restarts at the cycle's peak, as at a constant batch."""
    c = _config(
        ((0, 16), (1, 64)),
        64,
        epochs=3.5,
        warmup_epochs=0.5,
        decay="cosine",
        cycles=2,
        cycle_epochs=2.0,
        base_lr=0.008,
        base_batch=64,
        end_lr=1e-5,
        cycle_base_lr=0.008,
    )
    sched = batch_schedule.schedule_from_config(c, num_train=1000)  # 62 then 15 steps per epoch
    lr = sched.lr_schedule(c.optim)
    snapshots = sched.snapshot_steps(c.optim)
    # the main run ends at step round(3.5 x 15) = 52 of a batch-64 run, which takes 15 steps for the first epoch
    # where this one took 62: step 99; each cycle is 2 x 15 = 30 steps
    assert snapshots == [99, 129, 159] and sched.total_steps(c.optim) == snapshots[-1]
    for s in snapshots[1:]:  # a cycle's last step (the s-th, taken at count s - 1) is at end_lr ...
        assert float(lr(s - 1)) == pytest.approx(1e-5, rel=1e-4), s
    for s in snapshots[:-1]:  # ... and the next cycle's first at its peak
        assert float(lr(s)) == pytest.approx(0.008, rel=1e-6), s
    final = optim.make_schedule(c.optim, 15, 64)  # the main run's end: the batch-64 run's, 47 steps later
    assert float(lr(98)) == float(final(51)) and float(lr(98)) > float(lr(99 + 29))


def test_the_warmup_scales_with_the_batch_too():
    c = _config(
        ((0, 16), (5, 256)),
        256,
        epochs=10.0,
        warmup_epochs=5.0,
        warmup_init_lr=0.0032,
        end_lr=0.00032,
        base_lr=0.002,
        base_batch=16,
        decay="cosine",
    )
    sched = batch_schedule.schedule_from_config(c, num_train=3280)
    lr = sched.lr_schedule(c.optim)
    assert float(lr(0)) == pytest.approx(0.0032 / 16)  # the batch-256 run's warmup start, at batch 16
    assert float(lr(sched.phases[1].start_step - 1)) == pytest.approx(0.002, rel=0.01)  # the batch-16 peak
    assert float(lr(sched.phases[1].start_step)) == pytest.approx(0.032, rel=1e-6)  # the batch-256 peak


@pytest.mark.parametrize(
    "spec, global_batch, message",
    [
        (((1, 16), (5, 64)), 64, "must start at epoch 0"),
        (((0, 16), (5, 64), (5, 128)), 128, "start epochs must increase"),
        (((0, 16), (5, 64)), 128, "set train.global_batch=64"),
        (((0, 16), (2.5, 64)), 64, "pairs of whole numbers"),
        (((0, 16), (5,)), 64, "pairs of whole numbers"),
        (((0, 0), (5, 64)), 64, "must be positive"),
        (((0, 16), (50, 64)), 64, "starting at epoch 50, but the main run ends at epoch 10"),
        (((0, 16), (10, 64)), 64, "starting at epoch 10, but the main run ends at epoch 10"),
        (((0, 16), (5, 512)), 512, "train.batch_schedule: the training set has 300 images, fewer than one global"),
    ],
)
def test_bad_schedules_are_clear_errors(spec, global_batch, message):
    with pytest.raises(ValueError, match="train.batch_schedule|train.global_batch") as e:
        batch_schedule.schedule_from_config(_config(spec, global_batch, epochs=10.0), num_train=300)
    assert message in str(e.value)


def _tiny(store, *overrides):
    return load_config(
        TINY,
        [
            f"data.store={store}",
            "train.max_steps=0",
            "optim.epochs=3.0",
            "train.global_batch=16",
            "train.batch_schedule=((0, 4), (1, 8), (2, 16))",
            "train.checkpoint_every_steps=1",
            "train.keep_checkpoints=30",
            *overrides,
        ],
    )


def test_a_growing_batch_trains_logs_and_resumes_bit_for_bit(store, tmp_path):
    from tests.test_train import final_params, same_tree

    full = train_and_evaluate(_tiny(store), tmp_path / "full")
    from mcnn_jax.data import open_store, split_indices

    n_train = len(split_indices(open_store(store), _tiny(store).data)[0])
    spe = [n_train // 4, n_train // 8, n_train // 16]
    assert full["total_steps"] == full["final_step"] == sum(spe)
    assert full["batch_schedule"] == [[0, 4], [1, 8], [2, 16]] and full["global_batch"] == 16
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["global_batch"] for r in train] == [4] * spe[0] + [8] * spe[1] + [16] * spe[2]
    assert [r["epoch"] for r in train][spe[0] - 1] == 1.0 and train[-1]["epoch"] == 3.0
    val = [r for r in records if r["split"] == "val"]
    assert [r["epoch"] for r in val] == [1.0, 2.0, 3.0]
    # the learning rate follows the batch (linear rule): the batch-8 phase's first step is above the last of 4's
    assert train[spe[0]]["lr"] > train[spe[0] - 1]["lr"]

    # stopped inside the first phase and again inside the second, then resumed: the same weights, bit for bit
    part = tmp_path / "part"
    train_and_evaluate(_tiny(store, "train.max_steps=5"), part)
    train_and_evaluate(_tiny(store, f"train.max_steps={spe[0] + 2}"), part)
    resumed = train_and_evaluate(_tiny(store), part)
    assert resumed["start_step"] == spe[0] + 2 and resumed["final_step"] == sum(spe)
    assert same_tree(resumed["params"], final_params(tmp_path / "full"))


def test_each_phase_reads_every_training_image_once_per_epoch(store):
    """The trainer's batches are the phase readers' steps (``reader_step``); every epoch of every phase reads
    distinct training images; a resumed iterator continues with the same batches."""
    import contextlib

    from mcnn_jax.data import Reader, open_store, split_indices
    from mcnn_jax.parallel.world import init_world
    from mcnn_jax.train import _train_batches

    config = _tiny(store)
    st = open_store(store)
    train_idx, _ = split_indices(st, config.data)
    sched = batch_schedule.schedule_from_config(config, len(train_idx))
    world = init_world()
    total = sched.total_steps(config.optim)
    with contextlib.closing(_train_batches(config, st, train_idx, world, sched, 0)) as it:
        batches = [next(it) for _ in range(total)]
    assert [s for s, _ in batches] == list(range(total))
    with contextlib.closing(_train_batches(config, st, train_idx, world, sched, 11)) as it:
        later = [next(it) for _ in range(total - 11)]
    for (s, a), (t, b) in zip(batches[11:], later):
        assert s == t and np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    for epoch, p in enumerate(sched.phases):  # one epoch per phase here
        reader = Reader(st, train_idx, p.global_batch, seed=config.seed, augment=config.data.augment)
        try:
            seen = []
            for s in range(p.start_step, p.start_step + p.steps_per_epoch):
                rs = sched.reader_step(s)
                assert rs // p.steps_per_epoch == epoch
                assert np.array_equal(batches[s][1]["image"], reader.load(rs)["image"])
                seen += list(reader.global_batch_indices(rs)[0])
        finally:
            reader.close()
        assert len(seen) == len(set(seen)) == p.steps_per_epoch * p.global_batch  # the remainder is dropped
        assert set(seen) <= set(train_idx.tolist())
