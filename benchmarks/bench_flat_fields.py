"""Training on flat-background 8-bit fields: the case where max-pool windows hold many equal maxima.

Writes ``--images`` 8-bit PNG fields of bright, saturated discs on a black background (4 classes that differ
in disc size and count; channel 0 the discs at 255, channel 1 the same discs grown by a few pixels at 128,
channel 2 all zero), imports them with ``mcnn-data folder``, then trains the demo's model
(configs/default.py's widths, 256x256) with the published Nesterov recipe for ``--epochs`` epochs, once per
``--impls`` entry, and prints one JSON object: the validation accuracy after every epoch, the training loss
and gradient norm at every logged step, and the wall time of each run.

    python benchmarks/bench_flat_fields.py --out flat_fields.json          # native, fast and xla
    python benchmarks/bench_flat_fields.py --impls native --epochs 8

Issue 10 ran it before and after the max-pool gradient fix (the "before" numbers came from the same script
on the commit before the fix).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {  # name: (number of discs, radius range)
    "few_large": (5, (14, 20)),
    "many_small": (40, (3, 5)),
    "medium": (14, (7, 10)),
    "clustered": (14, (7, 10)),
}


def write_fields(out: Path, per_class: int, size: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for ci, (name, (count, (rmin, rmax))) in enumerate(CLASSES.items()):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = np.zeros((size, size, 3), np.uint8)
            lo, hi = (size // 4, size // 2) if name == "clustered" else (0, size)
            for _ in range(count):
                cy, cx = rng.integers(lo, hi, 2)
                r = rng.integers(rmin, rmax + 1)
                d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                im[..., 1][(d2 < (r + 4) ** 2) & (im[..., 1] == 0)] = 128
                im[..., 0][d2 < r * r] = 255
            Image.fromarray(im).save(out / name / f"field_{i:04d}.png")


def run(impl: str, store: Path, workdir: Path, epochs: int, size: int) -> dict:
    overrides = [
        f"data.store={store}",
        "data.synthetic.enabled=False",
        f"model.input_shape=({size}, {size}, 3)",
        f"model.impl={impl}",
        "optim.name=nesterov",
        "optim.momentum=0.9",
        "optim.base_lr=0.008",
        "optim.base_batch=16",
        "optim.warmup_init_lr=0.001",
        "optim.warmup_epochs=1.0",
        "optim.decay=linear",
        "optim.end_lr=0.0001",
        "optim.label_smoothing=0.1",
        "optim.weight_decay=5e-5",
        f"optim.epochs={float(epochs)}",
        "train.global_batch=16",
        "train.target_accuracy=0.0",
        "train.log_every_steps=4",
        "train.progress=log",
        "train.eval_every_epochs=1.0",
    ]
    cmd = [
        sys.executable,
        "-m",
        "mcnn_jax.cli.train",
        "--config",
        str(ROOT / "configs" / "default.py"),
        "--workdir",
        str(workdir),
        *[f"--config.{o}" for o in overrides],
    ]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"training with impl={impl} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in rows if x.get("split") == "val" or x.get("kind") == "val"]
    train = [x for x in rows if x.get("split") == "train" or x.get("kind") == "train"]
    return dict(
        impl=impl,
        wall_s=round(time.perf_counter() - t, 1),
        val_accuracy=[round(x["accuracy"], 4) for x in val],
        train_loss=[round(x["loss"], 4) for x in train],
        grad_norm=[round(x["grad_norm"], 3) for x in train],
        max_grad_norm=round(max(x["grad_norm"] for x in train), 3),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=ROOT / "runs" / "flat_fields")
    p.add_argument("--images", type=int, default=320, help="fields in all (split evenly over 4 classes)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--impls", default="native,fast,xla")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args(argv)
    images, store = a.dir / "png", a.dir / "store"
    if not (store / "COMPLETE").exists():
        write_fields(images, a.images // len(CLASSES), a.size, a.seed)
        subprocess.run(
            [sys.executable, "-m", "mcnn_jax.cli.data", "folder", "--images", str(images), "--out", str(store)],
            check=True,
            capture_output=True,
        )
    result = dict(images=a.images, size=a.size, epochs=a.epochs, runs=[])
    for impl in a.impls.split(","):
        workdir = a.dir / f"run_{impl}"
        subprocess.run(["rm", "-rf", str(workdir)], check=True)
        result["runs"].append(run(impl, store, workdir, a.epochs, a.size))
        print(json.dumps(result["runs"][-1]), file=sys.stderr, flush=True)
    text = json.dumps(result, indent=1)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
