"""``mcnn-train``: trains an M-CNN from a config file, on one process or under ``mpiexec -n N``.

    mcnn-train --config configs/default.py --workdir runs/default [--config.KEY=VALUE ...]
    mcnn-train --config configs/montage.py --dry-run [--ranks N]    # the expected peak memory per rank, then exit

Rerunning the same command resumes from the work directory's latest checkpoint. Overrides: any config key,
e.g. --config.train.global_batch=64 --config.optim.name=lars (a misspelt key is an error that lists the valid
ones). Exit codes: 0 done (or preempted, with a checkpoint saved), 2 bad input, 3 the loss diverged, 1 a crash.
"""

from __future__ import annotations

import sys
import traceback

from absl import flags, logging

# The package's modules are imported inside the functions below: `mcnn-train --help` and a config error answer
# before JAX and the trainer load (seconds on a cold start).


def _user_errors():
    """Errors that are the input's fault: printed as one line, without a traceback."""
    from mcnn_jax.data import StoreError

    return (ValueError, FileNotFoundError, StoreError)


def parse_args(argv):
    """(config, workdir) from the command line (``argv`` without the program name)."""
    from mcnn_jax.config import parse_config_flags

    if {"-h", "--help", "-help"} & set(argv):
        print(__doc__)
        sys.exit(0)
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the summary go", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "print the expected peak memory per rank and exit", flag_values=fv)
    flags.DEFINE_integer("ranks", 0, "with --dry-run: the number of MPI ranks (default: this launch's)", flag_values=fv)
    argv = ["mcnn-train", *["--dry_run" if a == "--dry-run" else a for a in argv]]
    try:
        parse_config_flags(argv, fv)
    except flags.Error as e:
        raise ValueError(f"{e}; usage: mcnn-train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]")
    if not fv.workdir and not fv.dry_run:
        raise ValueError("--workdir DIR is required")
    return fv.config, fv.workdir, fv.dry_run, fv.ranks


def dry_run(config, ranks: int) -> None:
    """Prints ``memory.estimate`` for the config (its ``model.input_shape``; the classes of its ``data.store`` if
    that exists, else of its synthetic screen, else ``model.num_classes``) as a summary and as JSON."""
    import json
    from pathlib import Path

    from mcnn_jax.data import open_store
    from mcnn_jax.memory import describe, estimate

    if config.data.store and Path(config.data.store).exists():
        classes = len(open_store(config.data.store).class_names)
    elif config.data.synthetic.enabled:
        classes = config.data.synthetic.num_classes
    else:
        classes = config.model.num_classes
    est = estimate(config, num_classes=classes, ranks=ranks)
    print(describe(est))
    print(json.dumps(est))


def _fail(world, code: int, message: str):
    logging.error(message)
    if world.size > 1:
        world.abort(code)
    sys.exit(code)


def main(argv=None):
    from mcnn_jax.parallel.world import fail_fast, init_world
    from mcnn_jax.runtime import enable_compilation_cache, setup_logging

    world = init_world()
    setup_logging(rank=world.rank, size=world.size)  # train_and_evaluate adds the per-rank file
    fail_fast(world)
    try:
        config, workdir, dry, ranks = parse_args(sys.argv[1:] if argv is None else argv)
        enable_compilation_cache()
        if dry:
            if world.is_primary:
                dry_run(config, ranks or world.size)
            return
        from mcnn_jax.train import TrainingDiverged, train_and_evaluate

        try:
            train_and_evaluate(config, workdir, world)
        except TrainingDiverged as e:  # every rank sees the same (reduced) loss
            if world.is_primary:
                logging.error(f"mcnn-train: {e}")
            sys.exit(3)
    except SystemExit:
        raise
    except _user_errors() as e:
        _fail(world, 2, f"mcnn-train: error: {e}")
    except Exception:
        _fail(world, 1, f"mcnn-train: failed:\n{traceback.format_exc()}")


if __name__ == "__main__":
    main()
