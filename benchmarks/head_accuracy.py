"""What each ``model.head`` costs in accuracy: the demo's recipe on the synthetic screen at 1024x1280, one run per head.

Every head trains with ``configs/default.py``'s model and optimizer on one synthetic screen at full resolution
(generated once, by the first run, into its work directory; the others read that store), for ``--epochs``
epochs without early stopping, and the validation accuracy after every epoch is read from each run's
``metrics.jsonl``. Prints JSON (and writes it to ``--out``).

    python benchmarks/head_accuracy.py --workdir /tmp/heads                    # ~30 min on 2 cores
    python benchmarks/head_accuracy.py --heads flatten,global_max --images 240 --classes 8 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_train import emit  # benchmarks/ is on sys.path when a script of it runs

ROOT = Path(__file__).resolve().parents[1]
# runs argv[1:], passes its exit code on, and prints its peak resident memory (bytes) as stderr's last line
PEAK_OF_CHILD = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_rss_bytes', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); "
    "sys.exit(rc)"
)


def train_run(config: Path, workdir: Path, overrides: list[str], store: Path | None = None) -> dict:
    """Runs ``mcnn-train --config config`` with ``overrides`` (and ``data.store=store`` if given) into ``workdir``;
    returns the validation loss and accuracy after every evaluation (from ``metrics.jsonl``), best and last,
    images/s, the wall time and mcnn-train's peak resident memory. Exits naming the run if mcnn-train fails."""
    if store is not None:
        overrides = [*overrides, f"data.store={store}"]
    cmd = [sys.executable, "-m", "mcnn_jax.cli.train", "--config", str(config), "--workdir", str(workdir)]
    cmd += [f"--config.{o}" for o in overrides]
    t = time.perf_counter()
    # through a small parent of its own, whose RUSAGE_CHILDREN peak is mcnn-train's alone
    proc = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{workdir}: mcnn-train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak_rss = int(proc.stderr.strip().splitlines()[-1].split()[-1])
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val"]
    summary = json.loads((workdir / "summary.json").read_text())
    return dict(
        val_accuracy_per_epoch=[round(r["accuracy"], 4) for r in val],
        val_loss_per_epoch=[round(r["loss"], 6) for r in val],
        best=round(max(r["accuracy"] for r in val), 4),
        last=round(val[-1]["accuracy"], 4),
        images_per_s=summary.get("images_per_s"),
        wall_s=round(time.perf_counter() - t, 1),
        peak_rss_gb=round(peak_rss / 1e9, 3),
    )


def train(workdir: Path, head: str, a, store: Path | None) -> dict:
    overrides = [
        f"data.synthetic.num_images={a.images}",
        f"data.synthetic.num_classes={a.classes}",
        "data.synthetic.height=1024",
        "data.synthetic.width=1280",
        "data.augment.rot90=False",
        "model.input_shape=(1024, 1280, 3)",
        f"model.head={head}",
        f"optim.epochs={float(a.epochs)}",
        "train.target_accuracy=0.0",
        "train.progress=log",
        f"seed={a.seed}",
    ]
    return dict(head=head, **train_run(ROOT / "configs" / "default.py", workdir, overrides, store))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--heads", default="flatten,global_max,global_avg")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    root = Path(a.workdir)
    runs, store = [], None
    for head in a.heads.split(","):
        runs.append(train(root / head, head, a, store))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        store = store or root / head / "data" / "store"
    result = dict(
        benchmark="head_accuracy",
        config="configs/default.py at 1024x1280",
        images=a.images,
        classes=a.classes,
        validation_images=round(a.images * 0.2),  # configs/default.py: data.val_fraction 0.2, stratified
        epochs=a.epochs,
        seed=a.seed,
        runs=runs,
    )
    emit(result, a.out)


if __name__ == "__main__":
    main()
