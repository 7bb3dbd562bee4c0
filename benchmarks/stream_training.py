"""Streamed and unstreamed training are the same run: ``configs/montage.py`` (2x2 whole-well montages of a synthetic
screen, branches 0-2 in tiles of 256) trained with ``model.stream_tile`` on and off, on the same store, seed and
schedule; the validation loss and accuracy after every epoch of each, and their largest differences. Prints JSON
(and writes it to ``--out``).

    python benchmarks/stream_training.py --workdir /tmp/st                      # 512x640 montages, 6 epochs
    python benchmarks/stream_training.py --workdir /tmp/st2k --site 1024x1280 --images 64 --epochs 3 --batch 4
        # 2048x2560 montages of full-resolution sites (16 wells), a short run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import emit  # noqa: E402
from head_accuracy import ROOT, train_run  # noqa: E402


def dry_run(config: Path, overrides: list[str]) -> int:
    """``mcnn-train --dry-run``'s expected peak memory per rank (bytes) for the config with ``overrides``."""
    cmd = [sys.executable, "-m", "mcnn_jax.cli.train", "--config", str(config), "--dry-run"]
    proc = subprocess.run([*cmd, *[f"--config.{o}" for o in overrides]], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--site", default="", help="HxW of a site (default: the config's 256x320)")
    p.add_argument("--images", type=int, default=0, help="sites in the screen (default: the config's 256)")
    p.add_argument("--epochs", type=float, default=0, help="default: the config's 6")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's 8)")
    p.add_argument("--tile", type=int, default=256, help="model.stream_tile of the streamed run")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    overrides = []
    if a.site:
        h, w = (int(v) for v in a.site.split("x"))
        overrides += [
            f"data.synthetic.height={h}",
            f"data.synthetic.width={w}",
            f"model.input_shape=({2 * h}, {2 * w}, 3)",
        ]
    if a.images:
        overrides.append(f"data.synthetic.num_images={a.images}")
    if a.epochs:
        overrides.append(f"optim.epochs={a.epochs}")
    if a.batch:
        overrides += [f"train.global_batch={a.batch}", f"optim.base_batch={a.batch}"]
    root, config = Path(a.workdir), ROOT / "configs" / "montage.py"
    runs = {}
    for name, tile in (("streamed", a.tile), ("unstreamed", 0)):
        store = None if name == "streamed" else root / "streamed" / "data" / "store"  # the first run's screen
        keys = [*overrides, f"model.stream_tile={tile}"]
        run = runs[name] = dict(stream_tile=tile, **train_run(config, root / name, keys, store))
        est = dry_run(config, keys)  # mcnn-train --dry-run's estimate of the same run, against its measured peak
        run.update(
            estimate_peak_gb=round(est / 1e9, 3), measured_over_estimate=round(run["peak_rss_gb"] * 1e9 / est, 3)
        )
        print(json.dumps({name: run}), file=sys.stderr, flush=True)
    s, u = runs["streamed"], runs["unstreamed"]
    result = dict(
        benchmark="stream_training",
        config="configs/montage.py",
        overrides=overrides,
        runs=runs,
        max_accuracy_difference=max(
            abs(x - y) for x, y in zip(s["val_accuracy_per_epoch"], u["val_accuracy_per_epoch"])
        ),
        max_loss_relative_difference=max(
            abs(x - y) / max(abs(y), 1e-12) for x, y in zip(s["val_loss_per_epoch"], u["val_loss_per_epoch"])
        ),
        # training images/s (summary.json; the first run's wall time also generates the screen)
        unstreamed_over_streamed_images_per_s=round(u["images_per_s"] / s["images_per_s"], 3),
    )
    emit(result, a.out)


if __name__ == "__main__":
    main()
