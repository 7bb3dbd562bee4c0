"""``mcnn-loco``: the leave-one-compound-out protocol, whole (see ``mcnn_jax.evaluation.loco``)."""

from __future__ import annotations

import argparse
import sys

from mcnn_jax.config import load_config
from mcnn_jax.data import StoreError
from mcnn_jax.evaluation import loco
from mcnn_jax.evaluation import profiles as P
from mcnn_jax.evaluation.loco import (
    MARKER,
    LocoError,
    fold_compounds,
    fold_dir,
    format_loco_report,
    merged_report,
    open_loco_store,
    run_fold,
    select,
)
from mcnn_jax.evaluation.profile_metrics import add_options as add_profile_options
from mcnn_jax.evaluation.profile_metrics import options_from_args
from mcnn_jax.evaluation.run import EVAL_BATCH
from mcnn_jax.runtime import enable_compilation_cache


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="mcnn-loco", description=loco.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="the training config (every fold uses it)")
    p.add_argument("--workdir", required=True, help="folds go to WORKDIR/folds/, the report to WORKDIR")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--fold", type=int, default=None, help="run fold K only (0-based; see --list)")
    which.add_argument("--compounds", default="", help="comma-separated compounds to hold out (default: all)")
    p.add_argument("--list", action="store_true", help="list the folds and exit")
    p.add_argument("--report", action="store_true", help="only write the merged report of the finished folds")
    p.add_argument("--no-report", action="store_true", help="run the fold(s) only (SLURM array tasks)")
    p.add_argument("--launcher", default="", help="prefix of each fold's training command, e.g. 'mpiexec -n 2'")
    p.add_argument("--layer", default="hidden", choices=("hidden", "merge"), help="embedding layer for NSC/NSCB")
    p.add_argument(
        "--checkpoint",
        default="latest",
        help="what each fold evaluates: latest (default), snapshots "
        "(the collapsed ensemble: needs --config.optim.cycles=N) or a comma-separated list of steps; an "
        "ensemble predicts with the mean of its members' probabilities and embeds with their features "
        "side by side. Not best: it is picked by accuracy on the held-out compound, the test set",
    )
    p.add_argument("--batch", type=int, default=EVAL_BATCH, help=f"images per forward pass (default {EVAL_BATCH})")
    add_profile_options(p)  # --normalize, --level, --nscb-rule, --control (also not a fold), mAP options
    args, rest = p.parse_known_args(argv)
    if "best" in [w.strip() for w in args.checkpoint.split(",")]:
        p.error(
            "--checkpoint best is refused: the best checkpoint is the one with the highest accuracy on the "
            "fold's validation images, which are the held-out compound's, so picking it would select on the "
            "test set; use latest (default), snapshots or step numbers"
        )
    bad = [r for r in rest if not r.startswith("--config.") or "=" not in r]
    if bad:
        p.error(f"unrecognised argument(s) {bad}; config overrides look like --config.train.max_steps=8")
    return args, [r[len("--config.") :] for r in rest]


def main(argv=None):

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    enable_compilation_cache()
    try:
        opts = options_from_args(args)
        config = load_config(args.config, overrides)
        if args.checkpoint == "snapshots" and not config.optim.cycles and not (args.list or args.report):
            raise LocoError(
                "--checkpoint snapshots evaluates the collapsed ensemble's snapshots, which a fold's "
                "training makes only with optim.cycles > 0: add --config.optim.cycles=N (see "
                "optim.cycle_epochs and optim.cycle_base_lr)"
            )
        store = open_loco_store(config, args.workdir, prepare=not (args.report or args.list))
        compounds = fold_compounds(store, args.control)
        if args.list:
            for k, c in enumerate(compounds):
                print(f"{k}\t{c}\t{'finished' if (fold_dir(args.workdir, compounds, c) / MARKER).is_file() else ''}")
            return
        if not args.report:
            for c in select(compounds, args.compounds, args.fold, store.path):
                run_fold(args, overrides, store, compounds, c, log=lambda m: print(f"mcnn-loco: {m}", flush=True))
        if not args.no_report:
            chosen = select(compounds, args.compounds, None, store.path) if args.compounds else None
            print(format_loco_report(merged_report(args.workdir, store, compounds, opts, chosen)))
    except (LocoError, P.TableError, FileNotFoundError, StoreError, ValueError) as e:
        print(f"mcnn-loco: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
