"""Bucketed batching shared by the sources of real images (an image folder, WebDataset shards).

Items come from a per-rank stream in a seeded order and wait in the aspect bucket nearest to their
size; when a bucket holds a batch's worth they are decoded and emitted, one bucket per batch.
Buckets fill in stream order, so rare shapes wait. An item that fails to decode is dropped and
counted, and its bucket keeps drawing until it is full again: a batch never shrinks.

Choosing a batch's items (`plan`) and decoding them (`build`) are separate steps, so worker
processes can decode while this process keeps choosing (pixelrun/data/loader.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pixelrun.data import Batch, Rejected
from pixelrun.data.buckets import nearest_bucket

SKIPPED_NAMES_CAP = 100  # names of skipped items kept for the end-of-run report


@dataclass
class BucketPlan:
    """One batch to decode: the first `batch_size` items waiting in bucket `bucket`, at `size`."""

    bucket: int
    size: tuple[int, int]
    items: list[Any]


class BucketedBatchSource:
    """The batching half of a source. A subclass supplies the stream and the pixels:

    * `_draw()`: move the next item of this rank's stream into its bucket with `_enqueue` (or skip it);
    * `_decode(item, h, w)`: the item as uint8 [h, w, 3], or None if it does not decode;
    * `_reject(item)`: remember and count an item that did not decode (`_count_skip`);
    * `_usable(item)`: False once an item is known to be bad;
    * `_batch(items, images)`: the `Batch`;
    * `state_dict()`, `_load_position(state)` (everything but the waiting items) and
      `_waiting(state["fill"])` (the waiting items again, from their saved form).

    `_decode` and `_batch` must read only what never changes as the stream advances (paths,
    settings): worker processes run them on a copy of the source made when they started.
    """

    def _init_batching(
        self,
        batch_size: int,
        buckets: list[tuple[int, int]],
        seed: int,
        rank: int,
        world_size: int,
        min_side: int = 1,
    ) -> None:
        if batch_size < 1 or not buckets:
            raise ValueError("need batch_size >= 1 and at least one bucket")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.buckets = batch_size, [(b[0], b[1]) for b in buckets]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.min_side = min_side
        self._fill: list[list[Any]] = [[] for _ in self.buckets]  # items waiting per bucket
        self._ready: list[int] = []  # full buckets, in the order they filled
        self._share_epoch, self._share = -1, np.empty(0, dtype=np.int64)
        self.skipped = 0
        self.skipped_paths: list[str] = []

    # -- what a subclass supplies (see the class docstring)

    def _draw(self) -> None:
        raise NotImplementedError

    def _decode(self, item: Any, h: int, w: int) -> np.ndarray | None:
        raise NotImplementedError

    def _reject(self, item: Any) -> None:
        raise NotImplementedError

    def _usable(self, item: Any) -> bool:
        raise NotImplementedError

    def _batch(self, items: list[Any], images: list[np.ndarray]) -> Batch:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def _load_position(self, state: dict) -> None:
        raise NotImplementedError

    def _waiting(self, fill: list) -> list[list[Any]]:
        raise NotImplementedError

    def __iter__(self):
        return self

    def _epoch_share(self, epoch: int, n: int) -> np.ndarray:
        """This rank's part of epoch `epoch`: positions rank, rank + world_size, ... of a permutation
        of n seeded by (seed, epoch), so ranks never share an item within an epoch."""
        if self._share_epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._share_epoch, self._share = epoch, perm[self.rank :: self.world_size]
        return self._share

    def _enqueue(self, item, size: tuple[int, int]) -> None:
        k = self.buckets.index(nearest_bucket(*size, self.buckets))
        self._fill[k].append(item)
        if len(self._fill[k]) == self.batch_size and k not in self._ready:
            self._ready.append(k)

    def _too_small(self, size: tuple[int, int]) -> str | None:
        """Why an image of `size` (height, width) is not trained on, or None. An image with a side
        under the patch size holds less than one patch of its own: upscaled to a bucket it becomes
        a few flat colours, which teaches the model nothing about its caption."""
        h, w = size
        if min(h, w) >= self.min_side:
            return None
        return f"{w}x{h} pixels, a side under the patch size {self.min_side}"

    def _count_skip(self, name: str) -> None:
        self.skipped += 1
        if len(self.skipped_paths) < SKIPPED_NAMES_CAP:
            self.skipped_paths.append(name)

    # -- the next batch: choose (this process), decode (here or in a worker), take or reject

    def _next_plan(self) -> BucketPlan:
        """The batch the head of the queue of full buckets would give, drawing until there is one."""
        while not (self._ready and len(self._fill[self._ready[0]]) >= self.batch_size):
            self._draw()
        k = self._ready[0]
        return BucketPlan(k, self.buckets[k], self._fill[k][: self.batch_size])

    def _take(self, plan: BucketPlan) -> None:
        k = plan.bucket
        del self._fill[k][: self.batch_size]
        self._ready.pop(0)
        if len(self._fill[k]) >= self.batch_size:  # it overfilled while waiting in the queue
            self._ready.append(k)

    def build(self, plan: BucketPlan) -> Batch | Rejected:
        h, w = plan.size
        images = [self._decode(item, h, w) for item in plan.items]
        decoded = [im for im in images if im is not None]
        if len(decoded) < len(images):
            return Rejected([j for j, im in enumerate(images) if im is None])
        return self._batch(plan.items, decoded)

    def reject(self, plan: BucketPlan, rejected: Rejected) -> None:
        """Count and drop a plan's items that did not decode. Called in the state the plan was
        chosen in (before `_take`): its bucket stays at the head of the queue and keeps drawing."""
        for j in rejected.positions:
            self._reject(plan.items[j])
        self._fill[plan.bucket] = [it for it in self._fill[plan.bucket] if self._usable(it)]

    def __next__(self) -> Batch:
        while True:
            plan = self._next_plan()
            out = self.build(plan)
            if not isinstance(out, Rejected):
                self._take(plan)
                return out
            self.reject(plan, out)

    def plan(self) -> tuple[BucketPlan, tuple]:
        """The next batch's plan, moving past it as if it had decoded, and the snapshot to `restore`
        (then `reject`) if it did not: the state it was chosen in."""
        plan = self._next_plan()
        before = self.snapshot()
        self._take(plan)
        return plan, before

    # -- position

    def snapshot(self) -> tuple[dict, list[list[Any]]]:
        """The position in memory: `state_dict()` and the waiting items themselves (restoring it
        needs no re-reading)."""
        return self.state_dict(), [list(f) for f in self._fill]

    def restore(self, snapshot: tuple[dict, list[list[Any]]]) -> None:
        state, fill = snapshot
        self._load_position(state)
        self._fill = [list(f) for f in fill]

    def load_state_dict(self, state: dict) -> None:
        self._load_position(state)
        self._fill = self._waiting(state["fill"])
