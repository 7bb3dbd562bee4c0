"""The gradient noise scale B_simple (``mcnn_jax.optim.noise_scale``) of runs' checkpoints: the global batch beyond
which
a larger batch stops keeping its accuracy at the same number of epochs (McCandlish et al. 2018).

    python benchmarks/measure_noise_scale.py --run study/runs/adamw_b16    # at initialisation and every kept checkpoint
    python benchmarks/measure_noise_scale.py --run A --run B --checkpoints latest --chunk 8 --out ns.json

For each run (a training workdir) and each of ``--checkpoints`` (``init``: the run's initial parameters, from its
config's seed; ``all``: every checkpoint kept; or ``latest``, ``best`` and step numbers, comma-separated), the
gradient of the run's training loss (its label smoothing; no augmentation) is taken on ``--chunk``-image chunks of
its training split (``--max-images``: the first ones of that split) and B_simple = tr(Sigma) / |G|^2 estimated
from the chunks. JSON on stdout (and ``--out``): one row per (run, checkpoint) with the step, epoch, training loss,
``b_simple``, ``trace_sigma`` and ``grad_norm_sq``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="a run's workdir (repeat for several)")
    p.add_argument("--checkpoints", default="init,all", help="init, all, latest, best or step numbers, comma-separated")
    p.add_argument("--chunk", type=int, default=8, help="images per chunk (the small batch of the estimate)")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--max-images", type=int, default=0, help="use only the first N images of the split (0: all)")
    p.add_argument("--out", default="", help="also write the JSON here")
    a = p.parse_args(argv)
    if a.chunk < 1:
        p.error(f"--chunk must be >= 1; got {a.chunk}")
    return a


def checkpoint_steps(ckpt, which: str) -> list:
    """``which`` resolved to a list of ``"init"`` and step numbers, in the order given."""
    out = []
    for w in (x.strip() for x in which.split(",") if x.strip()):
        if w == "init":
            out.append("init")
        elif w == "all":
            out += ckpt.steps()
        else:
            try:
                step = ckpt.resolve(w)
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"{w!r}: {e}") from None
            if step is None:
                raise SystemExit(f"no checkpoint {w!r} in {ckpt.directory}; kept steps: {ckpt.steps()}")
            out.append(step)
    return list(dict.fromkeys(out))


def measure_run(workdir: Path, which: str, chunk: int, split: str, max_images: int) -> list[dict]:
    import jax
    import numpy as np

    from mcnn_jax.checkpoint import Checkpointer
    from mcnn_jax.config import restore_config
    from mcnn_jax.data import Reader, open_store, split_indices
    from mcnn_jax.evaluation.run import load_ensemble
    from mcnn_jax.model.mcnn import from_config, init_params
    from mcnn_jax.optim.batch_schedule import schedule_from_config as batch_schedule
    from mcnn_jax.optim.noise_scale import gradient_noise_scale

    ckpt = Checkpointer(workdir, write=False)
    try:
        if not ckpt.steps():
            raise SystemExit(f"no checkpoint in {ckpt.directory}: is {workdir} a training workdir?")
        steps = checkpoint_steps(ckpt, which)
        meta = ckpt.meta(ckpt.steps()[-1])
    finally:
        ckpt.close()
    config = restore_config(meta["config"])
    store = open_store(meta["store"])
    train_idx, val_idx = split_indices(store, config.data)
    idx = train_idx if split == "train" else val_idx
    if max_images:
        idx = idx[:max_images]
    epochs = batch_schedule(config, len(train_idx)).epoch  # steps -> epochs (train.batch_schedule too)
    numbered = [s for s in steps if s != "init"]
    model, members, _ = (
        load_ensemble(workdir, ",".join(map(str, numbered)))
        if numbered
        else (from_config(config.model, num_classes=meta["num_classes"]), [], [])
    )
    params = dict(zip(numbered, members))
    if "init" in steps:
        params["init"] = init_params(model, jax.random.key(config.seed), tuple(config.model.input_shape))
    rows = []
    with Reader(store, idx, chunk, augment=None, train=False) as reader:  # one pass of it per checkpoint
        for s in steps:
            t0 = time.perf_counter()
            r = gradient_noise_scale(
                model, params[s], (b for _, b in reader.iterate()), meta["num_classes"], config.optim.label_smoothing
            )
            step = 0 if s == "init" else int(s)
            rows.append(
                dict(
                    run=str(workdir),
                    checkpoint=s,
                    step=step,
                    epoch=epochs(step),
                    split=split,
                    seconds=time.perf_counter() - t0,
                    **{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()},
                )
            )
            print(
                f"{workdir.name} {s}: B_simple {r['b_simple']:.1f} (tr Sigma {r['trace_sigma']:.4g}, |G|^2 "
                f"{r['grad_norm_sq']:.4g}; {r['images']} images)",
                file=sys.stderr,
                flush=True,
            )
    return rows


def main(argv=None):
    from bench_train import emit

    a = parse_args(argv)
    rows = []
    for run in a.run:
        rows += measure_run(Path(run), a.checkpoints, a.chunk, a.split, a.max_images)
    emit(dict(args=vars(a), rows=rows), a.out)
    return rows


if __name__ == "__main__":
    main()
