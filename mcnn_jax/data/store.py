"""The image store: one directory holding a zarr v3 TensorStore array of images plus labels and metadata.

Layout of a store directory::

    images.zarr/      zarr v3 array [N, H, W, C] (uint8 or uint16), one chunk per image, compressed (CODECS)
    labels.npy        int32 [N], indices into class_names
    metadata.json     {column: [N values]}: class, compound, concentration, plate, well, site, ...
    store.json        shape, dtype, class_names, channels, codec, how it was imported
    import.json       the import's fingerprint (lets an interrupted import resume)
    COMPLETE          the final marker, written atomically (temp file, fsync, os.replace) after everything else

A store without ``COMPLETE`` is incomplete and ``open_store`` refuses it with ``IncompleteStoreError``.
Images are read back as stored; ``to_float`` maps the stored integer range to [0, 1] (divide by 255 or 65535).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from mcnn_jax.data._util import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
ARRAY_DIR = "images.zarr"
LABELS = "labels.npy"
METADATA = "metadata.json"
INFO = "store.json"
IMPORT = "import.json"
MARKER = "COMPLETE"
_OWN_FILES = (MARKER, ARRAY_DIR, LABELS, METADATA, INFO, IMPORT, "illumination.npz")

# zarr v3 codec chains (after the "bytes" codec) compared by benchmarks/bench_reader.py. DEFAULT_CODEC is the
# compressor that decoded fastest here (1024x1280x3 uint16 synthetic fields, 2 shared cores): blosc lz4 with byte
# shuffle, ~220 images/s (~1.8 GB/s) at a ratio of ~1.1; "blosc-lz4-bit" compresses more (~1.24) at ~80-170
# images/s, zstd levels 1-9 ~35-100 images/s at ~1.2-1.7, gzip ~20-40 images/s. All are far above what training
# consumes (~1 image/s per process); choose "blosc-lz4-bit" or "zstd1" with --codec if disk space or I/O bound.
CODECS: dict[str, list[dict]] = {
    "none": [],
    "zstd1": [{"name": "zstd", "configuration": {"level": 1}}],
    "zstd3": [{"name": "zstd", "configuration": {"level": 3}}],
    "zstd9": [{"name": "zstd", "configuration": {"level": 9}}],
    "blosc-lz4": [{"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}}],
    "blosc-lz4-bit": [{"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}}],
    "blosc-zstd1-bit": [{"name": "blosc", "configuration": {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}}],
    "blosc-zstd1": [{"name": "blosc", "configuration": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"}}],
    "gzip1": [{"name": "gzip", "configuration": {"level": 1}}],
}
DEFAULT_CODEC = "blosc-lz4"
DTYPES = {"uint8": np.uint8, "uint16": np.uint16}


class StoreError(Exception):
    """A store cannot be opened or written (the message names the path)."""


class IncompleteStoreError(StoreError):
    """The store directory exists but its import never finished (no COMPLETE marker)."""


class ImportDataError(StoreError, ValueError):
    """The input of an import is bad: a missing / corrupt / wrongly shaped image, a bad CSV, an empty class."""


def is_complete(path) -> bool:
    return (Path(path) / MARKER).is_file()


def float_scale(dtype) -> np.float32:
    """The factor mapping a stored integer dtype's range to [0, 1]: 1 / its maximum (255 or 65535)."""
    return np.float32(1.0 / np.iinfo(dtype).max)


def to_float(images: np.ndarray) -> np.ndarray:
    """Maps a stored integer image to float32 in [0, 1]: multiplies by ``float_scale`` of its dtype."""
    return images.astype(np.float32) * float_scale(images.dtype)


def _spec(path: Path, shape=None, dtype: str | None = None, codec: str | None = None) -> dict:
    spec: dict[str, Any] = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path / ARRAY_DIR)},
        "store_data_equal_to_fill_value": True,
    }
    if shape is not None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
        chain = [{"name": "bytes", "configuration": {"endian": "little"}}]
        for c in CODECS[codec]:
            c = json.loads(json.dumps(c))
            if c["name"] == "blosc":
                c["configuration"]["typesize"] = np.dtype(dtype).itemsize
            chain.append(c)
        spec["metadata"] = {
            "shape": list(shape),
            "data_type": dtype,
            "fill_value": 0,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, *shape[1:]]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "codecs": chain,
            "dimension_names": ["image", "y", "x", "channel"],
        }
    return spec


def _context() -> ts.Context:
    # no chunk cache: every image is read once per epoch, caching would only hold memory
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}})


class Store:
    """An opened, complete image store (see the module docstring). Use ``open_store(path)``."""

    def __init__(self, path: Path, info: dict, labels: np.ndarray, metadata: dict, array: ts.TensorStore):
        self.path = path
        self.info = info
        self.labels = labels
        self.metadata = metadata
        self.array = array
        self.class_names: list[str] = list(info["class_names"])
        self.num_images: int = int(info["num_images"])
        self.image_shape: tuple[int, int, int] = tuple(info["image_shape"])
        self.dtype = np.dtype(info["dtype"])
        self.channels: list[str] = list(info.get("channels", []))

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, {self.num_images} images of {self.image_shape} {self.dtype}, "
            f"{len(self.class_names)} classes)"
        )

    def __len__(self) -> int:
        return self.num_images

    def read_async(self, index: int) -> ts.Future:
        """Starts reading image ``index``; the future's result is [H, W, C] in the stored dtype."""
        return self.array[int(index)].read()

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Reads images ``indices`` -> [len, H, W, C] in the stored dtype (all reads run concurrently)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image index out of range [0, {self.num_images}) in {self.path}")
        out = np.empty((idx.size, *self.image_shape), self.dtype)
        futures = [self.read_async(i) for i in idx]
        for k, f in enumerate(futures):
            out[k] = f.result()
        return out

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, counts)}

    @property
    def compounds(self) -> list[str]:
        """The distinct non-empty compound names, sorted."""
        return sorted({c for c in self.metadata.get("compound", []) if c})

    @property
    def nbytes(self) -> int:
        return int(self.num_images * np.prod(self.image_shape) * self.dtype.itemsize)

    def disk_bytes(self) -> int:
        total = 0
        for root, _, files in os.walk(self.path / ARRAY_DIR):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total


def open_store(path) -> Store:
    """Opens a complete store; raises IncompleteStoreError for an unfinished import (the store's files are there
    but not its COMPLETE marker), StoreError otherwise (no store here at all, or a damaged one)."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"no image store at {path}: the directory does not exist (create one with mcnn-data)")
    if not is_complete(path):
        if not any((path / name).exists() for name in (ARRAY_DIR, IMPORT, INFO, LABELS)):
            raise StoreError(
                f"{path} is not an image store: it holds none of a store's files ({ARRAY_DIR}, {IMPORT}, "
                f"{INFO}); create one with mcnn-data (bbbc021 | folder | manifest | ome-zarr | synthetic ... "
                f"--out {path}), or give the path of an existing store"
            )
        raise IncompleteStoreError(
            f"the image store at {path} is incomplete (no {MARKER} marker): its import was interrupted or is "
            f"still running; rerun the import (mcnn-data ... --out {path}) to finish it"
        )
    try:
        info = json.loads((path / INFO).read_text())
        labels = np.load(path / LABELS).astype(np.int32)
        metadata = json.loads((path / METADATA).read_text())
        array = ts.open(_spec(path), read=True, context=_context()).result()
    except Exception as e:  # noqa: BLE001 - any failure here means a damaged store
        raise StoreError(
            f"the image store at {path} is damaged ({type(e).__name__}: {e}); rerun the import with --overwrite"
        ) from e
    n = int(info["num_images"])
    if labels.shape != (n,) or tuple(array.shape) != (n, *info["image_shape"]):
        raise StoreError(
            f"the image store at {path} is inconsistent: {n} images in {INFO}, labels "
            f"{labels.shape}, array {tuple(array.shape)}"
        )
    return Store(path, info, labels, metadata, array)


class StoreWriter:
    """Writes a store; resumable. Call ``write(i, image)`` for every image, then ``finish(...)``.

    ``fingerprint`` describes the import (its inputs and options). If ``path`` holds an unfinished store with the
    same fingerprint, the images already on disk are kept (``done(i)`` is True for them) and the import
    resumes; otherwise the store's files are deleted and it starts over. A complete store is replaced only with
    ``overwrite=True`` (its marker is removed first, so it never looks complete while being rewritten).
    A directory that holds other files is never touched.
    """

    def __init__(
        self,
        path,
        num_images: int,
        image_shape: Sequence[int],
        dtype: str,
        codec: str = DEFAULT_CODEC,
        fingerprint: dict | None = None,
        overwrite: bool = False,
        max_in_flight: int = 8,
    ):
        self.path = path = Path(path)
        if num_images < 1:
            raise ImportDataError(f"nothing to import into {path}: no images")
        dtype = np.dtype(dtype).name
        if dtype not in DTYPES:
            raise ImportDataError(f"images must be uint8 or uint16, got {dtype} (store {path})")
        self.num_images, self.image_shape, self.dtype, self.codec = num_images, tuple(image_shape), dtype, codec
        fingerprint = dict(
            fingerprint or {},
            num_images=num_images,
            image_shape=list(image_shape),
            dtype=dtype,
            codec=codec,
            format_version=FORMAT_VERSION,
        )
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.max_in_flight = max_in_flight
        self._pending: list = []
        self.resumed = self._prepare(overwrite)
        if self.resumed:
            self.array = ts.open(_spec(path), read=True, write=True, context=_context()).result()
        else:
            self.array = ts.open(
                _spec(path, (num_images, *image_shape), dtype, codec),
                create=True,
                delete_existing=True,
                context=_context(),
            ).result()
            atomic_write_json(path / IMPORT, self.fingerprint)

    def _prepare(self, overwrite: bool) -> bool:
        path = self.path
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        if is_complete(path):
            if not overwrite:
                raise StoreError(
                    f"{path} already holds a complete image store; pass --overwrite (overwrite=True) to replace it"
                )
            (path / MARKER).unlink()
        entries = {p.name for p in path.iterdir() if not p.name.startswith(".")}
        if entries and not entries & set(_OWN_FILES):
            raise StoreError(
                f"{path} is not empty and is not an image store ({sorted(entries)[:5]}...); refusing to write into it"
            )
        try:
            old = json.loads((path / IMPORT).read_text())
        except (OSError, ValueError):
            old = None
        if old == self.fingerprint and (path / ARRAY_DIR / "zarr.json").is_file():
            return True
        for name in _OWN_FILES:
            p = path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return False

    def _chunk_file(self, i: int) -> Path:
        return self.path / ARRAY_DIR / "c" / str(int(i)) / "0" / "0" / "0"

    def done(self, i: int) -> bool:
        """True if image ``i`` is already on disk (tensorstore writes each chunk file atomically)."""
        return self._chunk_file(i).is_file()

    def write(self, i: int, image: np.ndarray) -> None:
        """Queues image ``i`` ([H, W, C], the store's dtype) for writing; at most max_in_flight at a time."""
        if image.shape != self.image_shape or image.dtype != np.dtype(self.dtype):
            raise ImportDataError(
                f"image {i} is {image.shape} {image.dtype}, the store takes "
                f"{self.image_shape} {self.dtype} ({self.path})"
            )
        self._pending.append(self.array[int(i)].write(image))
        if len(self._pending) >= self.max_in_flight:
            self._pending.pop(0).result()

    def flush(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def drain(self) -> None:
        """Waits for the queued writes, ignoring their errors: call it when an import stops on an error, so no
        write is still running when the store is reopened (or deleted) by a rerun."""
        while self._pending:
            try:
                self._pending.pop(0).result()
            except Exception:  # noqa: BLE001 - the import is failing already; its own error is the one to report
                pass

    def finish(
        self,
        labels: Sequence[int],
        class_names: Sequence[str],
        metadata: dict[str, list],
        channels: Sequence[str],
        info: dict | None = None,
    ) -> Path:
        """Writes labels, metadata and store.json, checks that every image is on disk, then the marker."""
        self.flush()
        labels = np.asarray(labels, dtype=np.int32)
        if labels.shape != (self.num_images,):
            raise StoreError(f"{len(labels)} labels for {self.num_images} images ({self.path})")
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise StoreError(f"labels out of range for {len(class_names)} classes ({self.path})")
        for k, v in metadata.items():
            if len(v) != self.num_images:
                raise StoreError(f"metadata column {k!r} has {len(v)} values for {self.num_images} images")
        missing = [i for i in range(self.num_images) if not self.done(i)]
        if missing:
            raise StoreError(
                f"{len(missing)} images were not written to {self.path} (e.g. index {missing[0]}); "
                f"the store is left incomplete"
            )
        import io

        buf = io.BytesIO()
        np.save(buf, labels)
        atomic_write_bytes(self.path / LABELS, buf.getvalue())
        atomic_write_json(self.path / METADATA, {k: list(v) for k, v in metadata.items()})
        full = dict(
            info or {},
            format_version=FORMAT_VERSION,
            num_images=self.num_images,
            image_shape=list(self.image_shape),
            dtype=self.dtype,
            codec=self.codec,
            codec_spec=CODECS[self.codec],
            class_names=list(class_names),
            channels=list(channels),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        atomic_write_json(self.path / INFO, full)
        atomic_write_json(self.path / MARKER, dict(num_images=self.num_images, finished=full["created"]))
        return self.path
