"""Bucketed batching shared by the sources of real images (an image folder, WebDataset shards).

Items come from a per-rank stream in a seeded order and wait in the aspect bucket nearest to their
size; when a bucket holds a batch's worth they are decoded (in `workers` threads) and emitted, one
bucket per batch. Buckets fill in stream order, so rare shapes wait. An item that fails to decode
is dropped and counted, and its bucket keeps drawing until it is full again: a batch never shrinks.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import Batch
from .buckets import nearest_bucket

SKIPPED_NAMES_CAP = 100  # names of skipped items kept for the end-of-run report


class BucketedBatchSource:
    """The batching half of a source. A subclass supplies the stream and the pixels:

    * `_draw()`: move the next item of this rank's stream into its bucket with `_enqueue` (or skip it);
    * `_decode(item, h, w)`: the item as uint8 [h, w, 3], or None if it does not decode;
    * `_reject(item)`: remember and count an item that did not decode (`_count_skip`);
    * `_usable(item)`: False once an item is known to be bad;
    * `_batch(items, images)`: the `Batch`.

    Decoding threads only ever see a batch's items: choosing them stays on the calling thread, so the
    batches (and a saved position) are the same for any number of workers.
    """

    def _init_batching(self, batch_size: int, buckets: list[tuple[int, int]], seed: int, rank: int,
                       world_size: int, workers: int) -> None:
        if batch_size < 1 or not buckets:
            raise ValueError("need batch_size >= 1 and at least one bucket")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.buckets = batch_size, [tuple(b) for b in buckets]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._fill: list[list[Any]] = [[] for _ in self.buckets]  # items waiting per bucket
        self._ready: list[int] = []  # full buckets, in the order they filled
        self._share_epoch, self._share = -1, np.empty(0, dtype=np.int64)
        self.skipped = 0
        self.skipped_paths: list[str] = []
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pixelrun-decode") if workers > 0 else None

    def __iter__(self):
        return self

    def _epoch_share(self, epoch: int, n: int) -> np.ndarray:
        """This rank's part of epoch `epoch`: positions rank, rank + world_size, ... of a permutation
        of n seeded by (seed, epoch), so ranks never share an item within an epoch."""
        if self._share_epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._share_epoch, self._share = epoch, perm[self.rank::self.world_size]
        return self._share

    def _enqueue(self, item, size: tuple[int, int]) -> None:
        k = self.buckets.index(nearest_bucket(*size, self.buckets))
        self._fill[k].append(item)
        if len(self._fill[k]) == self.batch_size and k not in self._ready:
            self._ready.append(k)

    def _count_skip(self, name: str) -> None:
        self.skipped += 1
        if len(self.skipped_paths) < SKIPPED_NAMES_CAP:
            self.skipped_paths.append(name)

    def __next__(self) -> Batch:
        B = self.batch_size
        while True:
            if self._ready and len(self._fill[self._ready[0]]) >= B:
                k = self._ready[0]
                h, w = self.buckets[k]
                items = self._fill[k][:B]
                decode = lambda item: self._decode(item, h, w)  # noqa: E731
                images = list(self._pool.map(decode, items)) if self._pool else [decode(it) for it in items]
                if all(im is not None for im in images):
                    del self._fill[k][:B]
                    self._ready.pop(0)
                    if len(self._fill[k]) >= B:  # it overfilled while waiting in the queue
                        self._ready.append(k)
                    return self._batch(items, images)
                for item, im in zip(items, images):
                    if im is None:
                        self._reject(item)
                # Drop them and keep this bucket at the head until it is full again.
                self._fill[k] = [it for it in self._fill[k] if self._usable(it)]
            self._draw()
