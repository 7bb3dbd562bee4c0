"""``mcnn-eval``: accuracy, per-class accuracy and confusion matrix of a trained run (see
``mcnn_jax.evaluation.evaluate``)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from mcnn_jax.data.store import StoreError
from mcnn_jax.evaluation import evaluate
from mcnn_jax.evaluation.embed import evaluate_to_table, format_treatment_summary
from mcnn_jax.evaluation.evaluate import evaluate_checkpoint, format_confusion
from mcnn_jax.evaluation.run import EVAL_BATCH
from mcnn_jax.runtime import enable_compilation_cache


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="mcnn-eval", description=evaluate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="best (default), latest, a step number, or an "
        "ensemble: snapshots (the collapsed ensemble's) or a comma-separated list of the former",
    )
    parser.add_argument("--store", default="", help="another store to evaluate on (default: the run's)")
    parser.add_argument("--split", default="val", choices=("val", "train", "all"))
    parser.add_argument("--batch", type=int, default=EVAL_BATCH, help=f"images per forward pass (default {EVAL_BATCH})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--predictions",
        default="",
        help="write one row per image (Metadata_*, true and "
        "predicted class, P_<class> probabilities) to this CSV or .parquet file, and print "
        "treatment-level and per-compound accuracy (mcnn_jax.evaluation.embed)",
    )
    args = parser.parse_args(argv)
    enable_compilation_cache()
    try:
        if args.predictions:
            result = evaluate_to_table(
                args.workdir, args.checkpoint, args.store, args.split, args.batch, args.predictions
            )
        else:
            result = evaluate_checkpoint(args.workdir, args.checkpoint, args.store, args.split, args.batch)
    except (FileNotFoundError, ValueError, StoreError) as e:
        print(f"mcnn-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    treatments = result.pop("treatment_summary", False)
    if args.json:
        print(json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}))
        return
    what = (
        f"checkpoint step {result['step']}"
        if len(result["members"]) == 1
        else f"ensemble of {len(result['members'])} checkpoints (steps {', '.join(map(str, result['members']))})"
    )
    print(f"{what} of {args.workdir}; {result['count']} images of {result['store']} ({args.split})")
    print(f"accuracy {result['accuracy']:.4f}   loss {result['loss']:.4f}")
    for name, acc in zip(result["class_names"], result["per_class_accuracy"]):
        print(f"  {name:<28s} {acc:.4f}")
    print(format_confusion(np.asarray(result["confusion"]), result["class_names"]))
    if treatments is not False:
        print(f"predictions written to {result['predictions']}")
        print(format_treatment_summary(treatments))


if __name__ == "__main__":
    main()
