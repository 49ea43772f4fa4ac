"""Data sources. Every source yields `Batch` objects and can save / restore its position."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, H, W]; one size per batch (one bucket); see to_model_range
    captions: list[str]
    # Caption embeddings read with the images (shards converted with a text encoder; see
    # pixelrun/data/shards.py): float32 [B, T, D] and bool [B, T]. None = encode the captions.
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """`Batch.images` (uint8) -> float32 in [-1, 1], the model's pixel range (RECIPE.md).

    Loaders hand over bytes and the training step converts after the copy to the device: a quarter
    of the bytes cross the bus, and on a GPU the conversion costs nothing, while on the loader's
    CPU it took half of the time of a 512 px batch (allocating and filling the float batch)."""
    return images.float().div_(127.5).sub_(1.0)


class CountedBatchSource:
    """A batch stream that is a pure function of its batch counter: batch k holds the items
    `self.indices(k)` of `self.dataset` at the size `self.bucket(k)`. Resuming needs only the
    counter, which is the same on every rank, so a position moves between rank counts."""

    next_batch: int = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        k = self.next_batch
        self.next_batch += 1
        h, w = self.bucket(k)
        items = [self.dataset.item(i, h, w) for i in self.indices(k)]
        return Batch(torch.stack([im for im, _ in items]), [c for _, c in items])

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])
