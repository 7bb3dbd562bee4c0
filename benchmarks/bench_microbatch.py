"""Micro-batching at full resolution (issue 13): peak memory and images/s of the real train step at 1024x1280x3
for one local batch split into micro-batches, one command, JSON out.

A layout ``MxK`` is K micro-batches of M images (local batch M x K; ``train.microbatch=M``), one update per step.
Each layout runs in a fresh subprocess (``bench_train.py``'s worker: the default model, 13 classes,
SGD-Nesterov, one compiling warm-up step, then ``--steps`` timed steps), so each peak RSS (``ru_maxrss``) is
its own; a child is killed above ``--max-rss-gb`` and a layout is skipped when the machine has not the memory.

    python benchmarks/bench_microbatch.py                                # 32x1, 8x4, 4x8 (local batch 32)
    python benchmarks/bench_microbatch.py --layouts 16x4 --steps 1       # local batch 64 on 24 GiB?
    python benchmarks/bench_microbatch.py --layouts 4x2,2x4 --height 256 --width 256 --steps 1   # quick

``fits_24gib`` says whether the measured peak RSS is below 24 GiB (the goal: a local batch of 64
full-resolution images trains on a 24 GiB machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            m, k = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--layouts: {item!r} is not MxK (micro-batch x number of micro-batches)") from None
        out.append((m, k))
    return out


def main(argv=None):
    from bench_train import emit, run_child
    from profile_step import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="32x1,8x4,4x8", help="comma-separated MxK: K micro-batches of M images")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one compiling warm-up step")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--variant", default="base", help="a bench_train.py variant (default: the default model)")
    p.add_argument("--max-rss-gb", type=float, default=20.0, help="kill a child above this RSS")
    p.add_argument(
        "--est-gb-per-image",
        type=float,
        default=0.6,
        help="peak GB per image of a micro-batch, to skip a layout the machine's available memory cannot hold",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="kill a child after this many seconds")
    p.add_argument("--out", default="", help="JSON file (also printed)")
    a = p.parse_args(argv)
    a.xla_flags = ""
    runs = []
    for m, k in parse_layouts(a.layouts):
        r = run_child(a.variant, m * k, a, microbatch=m)
        r.pop("machine", None)
        r["layout"] = f"{m}x{k}"
        if "peak_rss_gb" in r:
            r["fits_24gib"] = r["peak_rss_gb"] < 24.0
        runs.append(r)
        print(json.dumps(r), flush=True)
    emit(dict(machine=machine(), height=a.height, width=a.width, variant=a.variant, runs=runs), a.out)


if __name__ == "__main__":
    main()
