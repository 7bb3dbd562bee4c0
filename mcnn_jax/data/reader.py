"""The batch reader: each rank reads its disjoint slice of every global batch, one batch ahead, in threads.

Order. Training: epoch ``e``'s order is ``default_rng([seed, e, ...]).permutation(len(indices))``; global batch
``s`` is positions ``[p * G, (p + 1) * G)`` of epoch ``s // steps_per_epoch``'s order (``p = s % steps_per_epoch``,
the remainder of an epoch is dropped), and rank ``r`` takes its ``r``-th contiguous slice of ``G / num_ranks``
images. The global batch at a step is therefore the same for any number of ranks. Evaluation: one pass in
index order; the last global batch is padded (zeros, label 0, mask 0), so every rank gets the same number of
batches.

Asynchrony. Reads are TensorStore futures; decoding runs in TensorStore's thread pool and the augmentation /
float conversion in a background Python thread (numpy releases the GIL). ``prefetch`` batches are in flight
while the caller works on the current one. No processes are forked (TensorStore is not fork-safe).
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

from mcnn_jax.data.augment import Augment, apply_into, draw


class Reader:
    """Batches of a store for one rank; see the module docstring.

    ``augment``: a config's ``data.augment`` (ConfigDict / dict / Augment) or None; it only applies with
    ``train=True``. Batches are dicts ``image`` float32 [b, H, W, C] in [0, 1] (+ jitter), ``label`` int32 [b],
    ``mask`` float32 [b] with ``b = global_batch // num_ranks``.
    """

    def __init__(
        self,
        store,
        indices: Sequence[int],
        global_batch: int,
        rank: int = 0,
        num_ranks: int = 1,
        seed: int = 0,
        augment=None,
        train: bool = True,
        prefetch: int = 2,
        threads: int = 2,
    ):
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if global_batch < 1 or num_ranks < 1:
            raise ValueError(f"global_batch and num_ranks must be >= 1, got {global_batch} and {num_ranks}")
        if global_batch % num_ranks:
            raise ValueError(
                f"the global batch ({global_batch}) must be divisible by the number of ranks ({num_ranks})"
            )
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} is not in [0, {num_ranks})")
        if len(indices) == 0:
            raise ValueError("the reader got no images (empty index list)")
        if indices.min() < 0 or indices.max() >= store.num_images:
            raise ValueError(f"image indices must be in [0, {store.num_images}) for {store.path}")
        if train and len(indices) < global_batch:
            raise ValueError(
                f"the training set has {len(indices)} images, fewer than one global batch of {global_batch}"
            )
        self.store, self.indices, self.global_batch = store, indices, int(global_batch)
        self.rank, self.num_ranks, self.seed, self.train = int(rank), int(num_ranks), int(seed), bool(train)
        self.local_batch = self.global_batch // self.num_ranks
        if isinstance(augment, Augment):
            self.augment = augment
        else:
            self.augment = Augment.from_config(augment)
        if not train:
            self.augment = Augment()
        self.prefetch = max(0, int(prefetch))
        self.steps_per_epoch = (
            len(indices) // self.global_batch if train else math.ceil(len(indices) / self.global_batch)
        )
        self._pool = ThreadPoolExecutor(max(1, min(threads, self.prefetch or 1)), thread_name_prefix="mcnn-reader")
        self._labels = np.asarray(store.labels, dtype=np.int32)
        self._closed = False

    # --- which images ----------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Training: the store indices of epoch ``epoch`` in their shuffled order."""
        rng = np.random.default_rng([self.seed, int(epoch), 0x5EED])
        return self.indices[rng.permutation(len(self.indices))]

    def global_batch_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(store indices, valid) of the whole global batch at ``step`` (padding entries have valid False)."""
        g = self.global_batch
        if self.train:
            epoch, pos = divmod(int(step), self.steps_per_epoch)
            return self.epoch_order(epoch)[pos * g : (pos + 1) * g], np.ones(g, bool)
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"evaluation step {step} is outside [0, {self.steps_per_epoch})")
        pos = np.arange(step * g, (step + 1) * g)
        valid = pos < len(self.indices)
        return np.where(valid, self.indices[np.minimum(pos, len(self.indices) - 1)], 0), valid

    def batch_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(store indices, valid) of this rank's slice of the global batch at ``step``."""
        idx, valid = self.global_batch_indices(step)
        sl = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        return idx[sl], valid[sl]

    def batch_positions(self, step: int) -> np.ndarray:
        """Positions in ``indices`` of this rank's slice of evaluation step ``step`` (clipped for padding)."""
        pos = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        sl = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        return np.minimum(pos, len(self.indices) - 1)[sl]

    # --- reading ---------------------------------------------------------------------------------------------
    def load(self, step: int) -> dict:
        """Reads and prepares this rank's batch at ``step`` (synchronously)."""
        idx, valid = self.batch_indices(step)
        epoch = step // self.steps_per_epoch if self.train else 0
        h, w, c = self.store.image_shape
        futures = [self.store.read_async(i) if v else None for i, v in zip(idx, valid)]
        image = np.empty((len(idx), h, w, c), np.float32)
        aug = self.augment if self.augment.active else None
        for k, (i, f) in enumerate(zip(idx, futures)):
            if f is None:
                image[k] = 0.0
                continue
            params = draw(aug, self.seed, epoch, int(i), c, h == w) if aug is not None else None
            apply_into(image[k], f.result(), params)
        label = np.where(valid, self._labels[idx], 0).astype(np.int32)
        return dict(image=image, label=label, mask=valid.astype(np.float32))

    def iterate(self, start_step: int = 0) -> Iterator[tuple[int, dict]]:
        """Yields ``(step, batch)`` from ``start_step``: endless when training, one pass when evaluating."""
        if self._closed:
            raise RuntimeError("the reader is closed")
        end = None if self.train else self.steps_per_epoch
        queue: deque = deque()
        nxt = int(start_step)

        def fill(until):
            nonlocal nxt
            while nxt <= until and (end is None or nxt < end):
                queue.append((nxt, self._pool.submit(self.load, nxt)))
                nxt += 1

        try:
            step = int(start_step)
            while end is None or step < end:
                fill(step + self.prefetch)
                s, fut = queue.popleft()
                batch = fut.result()
                yield s, batch
                step += 1
        finally:
            for _, f in queue:
                f.cancel()

    def close(self) -> None:
        """Stops the background thread (pending reads are cancelled)."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
