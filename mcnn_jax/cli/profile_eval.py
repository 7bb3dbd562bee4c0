"""``mcnn-profile-eval``: NSC / NSCB and mAP of an embedding table (see ``mcnn_jax.evaluation.profile_metrics``)."""

from __future__ import annotations

import argparse
import sys

from mcnn_jax.evaluation.profile_metrics import (
    add_options,
    format_profile_report,
    options_from_args,
    profile_report,
    to_json,
)
from mcnn_jax.evaluation.profiles import TableError, read_table, write_json


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="mcnn-profile-eval",
        description="NSC / NSCB 1-nearest-neighbour MoA accuracy and mAP (copairs) of "
        "an image-level embedding table (Parquet or CSV with Metadata_Compound, Metadata_Concentration, "
        "Metadata_MoA, Metadata_Plate (Metadata_Well for --level well) and numeric feature columns).",
    )
    p.add_argument("table")
    add_options(p)
    p.add_argument("--json", default="", help="also write the result (and every match) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print the figures only, not every match")
    args = p.parse_args(argv)
    try:
        opts = options_from_args(args)
    except ValueError as e:
        p.error(str(e))
    try:
        res = profile_report(read_table(args.table), opts, source=args.table)
    except (TableError, FileNotFoundError) as e:
        print(f"mcnn-profile-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_profile_report(res, matches=not args.quiet))
    if args.json:
        write_json(to_json(res), args.json)


if __name__ == "__main__":
    main()
