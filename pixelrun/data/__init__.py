"""Data sources. Every source yields `Batch` objects and can save / restore its position
(`sources.BatchSource`); `sources.SOURCES` says what each value of `data.source` builds, checks,
holds out for evaluation and shows on the sample grids."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, H, W]; one size per batch (one bucket); see to_model_range
    captions: list[str]
    # Caption embeddings read with the images (shards converted with a text encoder; see
    # pixelrun/data/shards.py): float32 [B, T, D] and bool [B, T]. None = encode the captions.
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None

    def pin_memory(self) -> Batch:
        """The same batch in page-locked memory (the DataLoader's pin thread calls this on CUDA runs),
        so the copy to the GPU is one DMA transfer."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(self.images.pin_memory(), self.captions, pin(self.text), pin(self.text_mask))


@dataclass
class Rejected:
    """What `build(plan)` returns instead of a batch when items of the plan did not decode: their
    positions in the plan. The source then drops them and plans that batch again (see
    pixelrun/data/loader.py)."""

    positions: list[int]


@dataclass
class SourceImage:
    """One image to convert into shards (`pixelrun data convert`): a file, or encoded bytes read
    from a table, with its caption fields."""

    path: Path | None  # the image file (folders, manifests, tables storing paths), or None
    name: str  # for messages and the sample's json: relative to the source, or "TABLE row N"
    captions: dict[str, str]  # field name in the sample's json -> caption
    data: bytes | None = None  # the encoded image itself (tables)


class NoUsableData(ValueError):
    """A data source with nothing to train on (no captioned image, or none that decodes). The CLI
    reports it as a one-line error naming `data.path`."""


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """`Batch.images` (uint8) -> float32 in [-1, 1], the model's pixel range (docs/recipe.md).

    Loaders hand over bytes and the training step converts after the copy to the device: a quarter
    of the bytes cross the bus, and on a GPU the conversion costs nothing, while on the loader's
    CPU it took half of the time of a 512 px batch (allocating and filling the float batch)."""
    return images.float().div_(127.5).sub_(1.0)


class ItemDataset(Protocol):
    """What a counted source reads: item `index` as a uint8 [3, height, width] image and its caption."""

    def item(self, index: int, height: int, width: int) -> tuple[torch.Tensor, str]: ...


class CountedBatchSource:
    """A batch stream that is a pure function of its batch counter: batch k holds the items
    `self.indices(k)` of `self.dataset` at the size `self.bucket(k)`. Resuming needs only the
    counter, which is the same on every rank, so a position moves between rank counts."""

    dataset: ItemDataset
    next_batch: int = 0

    def indices(self, k: int) -> Sequence[int]:
        """The dataset indices of batch k on this rank (each source's own)."""
        raise NotImplementedError

    def bucket(self, k: int) -> tuple[int, int]:
        """The (height, width) of batch k (each source's own)."""
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return self.build(self.plan()[0])

    # The plan / build split that worker processes use (pixelrun/data/loader.py): the plan of batch
    # k is k itself, and building it needs nothing that changes as the counter moves.
    def plan(self) -> tuple[int, None]:
        k = self.next_batch
        self.next_batch += 1
        return k, None  # nothing to restore: a counted batch is never rejected

    def build(self, k: int) -> Batch:
        h, w = self.bucket(k)
        items = [self.dataset.item(i, h, w) for i in self.indices(k)]
        return Batch(torch.stack([im for im, _ in items]), [c for _, c in items])

    def snapshot(self) -> tuple[dict, None]:
        return self.state_dict(), None

    def restore(self, snapshot: tuple[dict, None]) -> None:
        self.load_state_dict(snapshot[0])

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])


class Prefetcher:
    """Builds the next batch of `source` in a background thread while the caller trains on the
    current one (`data.prefetch`), so decoding (and, given `encode`, the captions' text encoding)
    overlaps the step instead of adding to it.

    The source is still driven strictly in order, one batch at a time, so the batches are exactly
    those of the source alone. `state_dict` is the position after the last batch handed out (a
    snapshot taken before the next one is started), not the source's own position one batch ahead:
    a checkpoint resumes with the batch the caller has not seen yet. Anything else (`skipped`,
    `preview_captions`, ...) is the source's.
    """

    def __init__(self, source, encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.source = source
        self.encode = encode
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pixelrun-prefetch")
        self._pending: Future | None = None
        self._state: dict | None = None

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        batch = self._pending.result() if self._pending is not None else self._next()
        self._state = self.source.state_dict()
        self._pending = self._pool.submit(self._next)
        return batch

    def _next(self) -> Batch:
        """The source's next batch, its captions encoded by `encode` where the batch has no
        embeddings yet: at patch 16 the CPU default spent a third of its step in the text encoder,
        which in this thread overlaps the step instead of adding to it (docs/benchmarks.md)."""
        batch = next(self.source)
        if self.encode is None or batch.text is not None:
            return batch
        text, mask = self.encode(batch.captions)
        return dataclasses.replace(batch, text=text, text_mask=mask)

    def state_dict(self) -> dict:
        return self._state if self._state is not None else self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._drain()
        self.source.load_state_dict(state)
        self._state = None

    def close(self) -> None:
        """Wait for the batch in flight (it is dropped) and stop the thread, and the source's worker
        processes if it has any; the position stays."""
        self._drain()
        self._pool.shutdown()
        if hasattr(self.source, "close"):
            self.source.close()

    def _drain(self) -> None:
        if self._pending is not None:
            self._pending.exception()  # waits; an error there belongs to a batch nobody will use
            self._pending = None

    def __getattr__(self, name: str):
        if name == "source":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)
