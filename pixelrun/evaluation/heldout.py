"""The held-out data of a run: the captions and real images that evaluations and the validation
loss compare against, for every data source (the shapes "eval" split, the held-out emoji, a folder's
data.val_path or the images its seeded split holds out, the first items of data.val_path's shards or
else of the training shards), and the key that names them in caches."""

from __future__ import annotations

import dataclasses

import numpy as np

from pixelrun.config import Config
from pixelrun.data.sources import make_batch_source, source_kind


def dataset_key(cfg: Config) -> str:
    """What fixes an evaluation's real images (the dataset part of the real-statistics cache key)."""
    return source_kind(cfg).held_out_key(cfg)


def held_out_captions(cfg: Config, n: int) -> list[str]:
    """The captions of :func:`real_images_and_prompts`, without rendering or decoding an image where
    the source allows it (shapes, emoji); other sources read their first ``n`` items as it does."""
    kind = source_kind(cfg)
    if kind.held_out_captions is not None:
        return kind.held_out_captions(cfg, n)
    return real_images_and_prompts(cfg, n)[1]


def real_images_and_prompts(cfg: Config, n: int, at_most: bool = False) -> tuple[np.ndarray, list[str]]:
    """``n`` real images (uint8 ``[n, R, R, 3]`` at ``data.resolution``) and their captions: the
    source's held-out set (the shapes "eval" split from ``eval.seed``, the held-out emoji, the first
    ``n`` readable items of a folder's held-out set), or for shards the first ``n`` items a batch
    source of data.val_path yields in ``eval.seed``'s order (square, no buckets), without one those of
    the training stream. A held-out set smaller than ``n`` is an error naming eval.prompts, or with
    ``at_most`` gives all it has."""
    kind = source_kind(cfg)
    if kind.held_out is not None:
        return kind.held_out(cfg, n, at_most)
    data = dataclasses.replace(cfg.data, buckets=False)
    if cfg.data.val_path is not None:
        data = dataclasses.replace(data, path=cfg.data.val_path, val_path=None)
        cfg = dataclasses.replace(cfg, seed=cfg.eval.seed)
    return draw_real_images(make_batch_source(dataclasses.replace(cfg, data=data)), n)


def draw_real_images(source, n: int) -> tuple[np.ndarray, list[str]]:
    """The first ``n`` images (uint8) and captions a batch source yields."""
    images: list[np.ndarray] = []
    captions: list[str] = []
    while len(captions) < n:
        batch = next(source)
        images.append(batch.images.permute(0, 2, 3, 1).numpy())
        captions += batch.captions
    return np.concatenate(images)[:n], captions[:n]
