"""``mcnn-train``: trains an M-CNN from a config file, on one process or under ``mpiexec -n N``.

    mcnn-train --config configs/default.py --workdir runs/default [--config.KEY=VALUE ...]

Rerunning the same command resumes from the work directory's latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import traceback



def _user_errors():
    """Errors that are the input's fault: printed as one line, without a traceback."""
    from .data import StoreError
    return (ValueError, FileNotFoundError, StoreError)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="mcnn-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: any config key, e.g. --config.train.global_batch=64 --config.optim.name=lars "
               "(a misspelt key is an error that lists the valid ones).")
    parser.add_argument("--config", required=True, help="a config file (configs/NAME.py) or a config name")
    parser.add_argument("--workdir", required=True, help="where checkpoints, metrics and the summary go")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}; config overrides look like --config.train.global_batch=8")
        item = item[len("--config."):]
        if "=" not in item:
            if i + 1 >= len(rest):
                parser.error(f"--config.{item} needs a value")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return args, overrides


def run(argv=None):
    from .distributed import fail_fast, init_world
    from .runtime import enable_compilation_cache

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    enable_compilation_cache()
    world = init_world()
    fail_fast(world)
    prefix = f"[rank {world.rank}] " if world.size > 1 else ""
    try:
        from .config import load_config
        config = load_config(args.config, overrides)
        from .train import TrainingDiverged, train_and_evaluate
        try:
            train_and_evaluate(config, args.workdir, world)
        except TrainingDiverged as e:  # every rank sees the same (reduced) loss
            if world.is_primary:
                print(f"mcnn-train: {e}", file=sys.stderr, flush=True)
            sys.exit(3)
    except SystemExit:
        raise
    except _user_errors() as e:
        print(f"mcnn-train: {prefix}error: {e}", file=sys.stderr, flush=True)
        if world.size > 1:
            world.abort(2)
        sys.exit(2)
    except Exception:
        print(f"mcnn-train: {prefix}failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        if world.size > 1:
            world.abort(1)
        sys.exit(1)


if __name__ == "__main__":
    run()
