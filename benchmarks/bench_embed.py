"""Throughput of mcnn-embed's streaming loop (store read -> M-CNN forward -> features -> Parquet) at full resolution.

    python benchmarks/bench_embed.py                         # 1024x1280x3, 16 images, batch 4, hidden layer
    python benchmarks/bench_embed.py --images 8 --batch 2 --layer merge

Writes a temporary store of random uint16 fields, builds the published MCNN(num_classes=13) with random
parameters (throughput does not depend on their values), compiles on one warm-up batch, then times
``mcnn_jax.evaluation.embed.write_image_table`` (what ``mcnn-embed`` runs) over all images. Prints JSON.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from mcnn_jax import MCNN, init_params
from mcnn_jax.data import open_store
from mcnn_jax.data.store import StoreWriter
from mcnn_jax.evaluation.embed import iter_outputs, write_image_table
from mcnn_jax.runtime import enable_compilation_cache


def make_store(path: Path, n: int, shape) -> Path:
    rng = np.random.default_rng(0)
    w = StoreWriter(path, n, shape, "uint16")
    for i in range(n):
        w.write(i, rng.integers(0, 4096, shape, dtype=np.uint16))
    classes = [f"class{k}" for k in range(13)]
    meta = dict(
        compound=[f"c{i % 5}" for i in range(n)],
        concentration=[1.0] * n,
        plate=[f"Week{1 + i % 2}_1" for i in range(n)],
        well=["B02"] * n,
        site=[1] * n,
        **{"class": [classes[i % 13] for i in range(n)]},
    )
    return w.finish([i % 13 for i in range(n)], classes, meta, ["dapi", "tubulin", "actin"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layer", default="hidden", choices=("hidden", "merge"))
    args = p.parse_args()
    enable_compilation_cache()
    shape = (args.height, args.width, 3)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(make_store(Path(tmp) / "store", args.images, shape))
        model = MCNN(num_classes=13)
        params = init_params(model, jax.random.key(0), shape)
        t0 = time.perf_counter()
        next(iter_outputs(model, params, store, np.arange(args.batch), args.batch, args.layer))  # compile
        compile_s = time.perf_counter() - t0
        res = write_image_table(
            model,
            params,
            store,
            np.arange(args.images),
            Path(tmp) / "emb.parquet",
            "embeddings",
            args.layer,
            args.batch,
        )
    print(
        json.dumps(
            dict(
                image_shape=list(shape),
                images=args.images,
                batch=args.batch,
                layer=args.layer,
                impl=model.impl,
                images_per_s=round(res["images_per_s"], 3),
                seconds=round(res["seconds"], 2),
                warmup_compile_s=round(compile_s, 1),
                cpus=os.cpu_count(),
                load_average=os.getloadavg(),
            )
        )
    )


if __name__ == "__main__":
    main()
