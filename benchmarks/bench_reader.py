"""Reader and codec throughput at full resolution; prints one JSON object.

    python benchmarks/bench_reader.py [--images 24] [--height 1024] [--width 1280] [--batch 8] [--steps 12]

1. Generates a synthetic screen (``--images`` fields of H x W, 3 channels, 16-bit TIFFs) in a temp dir and imports
   it (per-plate scaling + illumination correction, uint16, the default codec): seconds per image for both.
2. Codecs: copies the imported images into one store per codec of ``mcnn_jax.data.store.CODECS`` and measures
   the compression ratio, the encode rate and the decode rate (every image read once, one at a time, best of
   ``--repeats``; the files are in the page cache, so this is the CPU cost of decoding).
3. Reader: ``Reader(train=True, augment=flips+rot180+jitter, prefetch=2)`` on one process: images/s and MB/s
   (stored bytes) over ``--steps`` global batches after one warm-up batch, compared with what a training step
   consumes (measured: ~0.76 images/s per 2-core process today; goal 1.25 images/s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcnn_jax.data import Reader, open_store
from mcnn_jax.data.bbbc021 import import_bbbc021
from mcnn_jax.data.store import CODECS, DEFAULT_CODEC, StoreWriter
from mcnn_jax.data.synthetic import generate_screen

TRAIN_TODAY = 0.76  # images/s per 2-core process, measured by the project
TRAIN_GOAL = 1.25


def bench_codecs(store, tmp: Path, repeats: int) -> dict:
    images = store.read(range(store.num_images))
    n = len(images)
    out = {}
    for name in CODECS:
        path = tmp / f"codec-{name}"
        t = time.perf_counter()
        w = StoreWriter(path, n, store.image_shape, store.dtype.name, name)
        for i, im in enumerate(images):
            w.write(i, im)
        w.flush()
        enc = time.perf_counter() - t
        w.finish(np.zeros(n, np.int32), ["x"], {}, store.channels)
        s = open_store(path)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for i in range(n):
                s.read_async(i).result()
            best = min(best, time.perf_counter() - t)
        assert np.array_equal(s.read([n - 1])[0], images[-1])
        out[name] = dict(
            ratio=round(s.nbytes / s.disk_bytes(), 3),
            encode_images_per_s=round(n / enc, 1),
            decode_images_per_s=round(n / best, 1),
            decode_MB_per_s=round(s.nbytes / best / 1e6, 1),
        )
        shutil.rmtree(path)
    return out


def bench_reader(store, batch: int, steps: int, prefetch: int) -> dict:
    aug = dict(flips=True, rot180=True, rot90=False, intensity_jitter=0.05)
    rd = Reader(store, np.arange(store.num_images), batch, seed=0, augment=aug, train=True, prefetch=prefetch)
    it = rd.iterate()
    next(it)  # warm-up
    t = time.perf_counter()
    for _ in itertools.islice(it, steps):
        pass
    dt = time.perf_counter() - t
    rd.close()
    images = steps * batch
    per_image = int(np.prod(store.image_shape)) * store.dtype.itemsize
    ips = images / dt
    return dict(
        images_per_s=round(ips, 2),
        MB_per_s_stored=round(ips * per_image / 1e6, 1),
        MB_per_s_float32=round(ips * per_image * 4 / store.dtype.itemsize / 1e6, 1),
        global_batch=batch,
        steps=steps,
        prefetch=prefetch,
        codec=store.info["codec"],
        ratio_to_goal_1_25=round(ips / TRAIN_GOAL, 1),
        ratio_to_today_0_76=round(ips / TRAIN_TODAY, 1),
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="global batch of the reader benchmark")
    ap.add_argument("--steps", type=int, default=12, help="batches timed (after one warm-up batch)")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="codec decode passes (best is reported)")
    ap.add_argument("--skip-codecs", action="store_true")
    ap.add_argument("--dir", type=Path, default=None, help="work here instead of a temp dir (kept)")
    args = ap.parse_args(argv)
    tmp = args.dir or Path(tempfile.mkdtemp(prefix="bench_reader_"))
    try:
        t = time.perf_counter()
        raw = generate_screen(tmp / "raw", args.images, args.classes, args.height, args.width, seed=0, progress=False)
        gen = time.perf_counter() - t
        t = time.perf_counter()
        store = open_store(
            import_bbbc021(
                raw,
                raw,
                tmp / "store",
                scaling="plate",
                illumination=True,
                dtype="uint16",
                codec=DEFAULT_CODEC,
                overwrite=True,
                progress=False,
            )
        )
        imp = time.perf_counter() - t
        result = dict(
            images=args.images,
            image_shape=list(store.image_shape),
            dtype=store.dtype.name,
            synthetic_generation_s_per_image=round(gen / args.images, 3),
            import_s_per_image=round(imp / args.images, 3),
            default_codec=DEFAULT_CODEC,
            reader=bench_reader(store, args.batch, args.steps, args.prefetch),
            training_consumes_images_per_s=dict(today=TRAIN_TODAY, goal=TRAIN_GOAL),
        )
        if not args.skip_codecs:
            result["codecs"] = bench_codecs(store, tmp, args.repeats)
        result["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
