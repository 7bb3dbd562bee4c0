"""``mcnn-report DIR``: PNG plots of a run (see ``mcnn_jax.evaluation.plots``)."""

from __future__ import annotations

import argparse
import sys

from mcnn_jax.evaluation import plots
from mcnn_jax.evaluation.plots import make_report


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="mcnn-report", description=plots.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        for path in make_report(args.workdir, args.out):
            print(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"mcnn-report: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
