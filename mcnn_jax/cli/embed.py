"""``mcnn-embed``: one row per image of a trained run's features (see ``mcnn_jax.evaluation.embed``)."""

from __future__ import annotations

import argparse
import sys

from mcnn_jax.data import StoreError
from mcnn_jax.evaluation import embed
from mcnn_jax.evaluation.embed import LAYERS, write_image_table
from mcnn_jax.evaluation.run import EVAL_BATCH, open_run
from mcnn_jax.runtime import enable_compilation_cache


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="mcnn-embed", description=embed.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="a .parquet or .csv file")
    p.add_argument("--layer", default="hidden", choices=LAYERS)
    p.add_argument(
        "--checkpoint",
        default="best",
        help="best (default), latest, a step number, or an ensemble: "
        "snapshots (the collapsed ensemble's, optim.cycles > 0) or a comma-separated list of the "
        "former; an ensemble's features are its members' side by side (hidden_m0_000, ...)",
    )
    p.add_argument("--store", default="", help="another store (default: the run's)")
    p.add_argument("--split", default="all", choices=("all", "val", "train"))
    p.add_argument("--batch", type=int, default=EVAL_BATCH, help=f"images per forward pass (default {EVAL_BATCH})")
    args = p.parse_args(argv)
    enable_compilation_cache()
    try:
        run = open_run(args.workdir, args.checkpoint, args.store, args.split)
        res = write_image_table(
            run.model, run.members, run.store, run.indices, args.out, "embeddings", args.layer, args.batch
        )
    except (FileNotFoundError, ValueError, StoreError) as e:
        print(f"mcnn-embed: error: {e}", file=sys.stderr)
        sys.exit(2)
    steps = ", ".join(map(str, run.steps))
    what = "" if len(run.steps) == 1 else f" of {len(run.steps)} checkpoints (steps {steps})"
    print(
        f"wrote {res['rows']} rows of {args.layer} features{what} to {res['path']} ({res['images_per_s']:.2f} images/s)"
    )


if __name__ == "__main__":
    main()
