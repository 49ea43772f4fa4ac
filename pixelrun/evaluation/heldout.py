"""The held-out data of a run: the captions and real images that evaluations and the validation
loss compare against, for every data source (the shapes "eval" split, the held-out emoji, the first
items of an image folder or of the shards), and the key that names them in caches."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from pixelrun.config import Config, ConfigError
from pixelrun.data import NoUsableData
from pixelrun.training.build import make_batch_source


def dataset_key(cfg: Config) -> str:
    """What fixes an evaluation's real images (the dataset part of the real-statistics cache key)."""
    d = cfg.data
    if d.source == "shapes":
        return f"shapes-eval-seed{cfg.eval.seed}-max{d.max_shapes}"
    if d.source == "emoji":
        return "emoji-heldout"
    if d.source == "folder":
        return f"folder:{os.path.realpath(d.path)}"
    return f"{d.source}:{d.path}:seed{cfg.seed}"  # drawn from the start of the training stream


def held_out_captions(cfg: Config, n: int) -> list[str]:
    """The captions of :func:`real_images_and_prompts`, without rendering or decoding an image where
    the source allows it (shapes, emoji); other sources read their first ``n`` items as it does."""
    if cfg.data.source == "shapes":
        from pixelrun.data.shapes import fixed_prompts

        return fixed_prompts(n, seed=cfg.eval.seed, max_shapes=cfg.data.max_shapes)
    if cfg.data.source == "emoji":
        from pixelrun.data.emoji import EmojiDataset

        captions = EmojiDataset("eval").captions
        if n > len(captions):
            raise ConfigError("eval.prompts", f"the emoji data holds out {len(captions)} images, {n} asked for "
                                              f"(lower eval.prompts)")
        return list(captions[:n])
    return real_images_and_prompts(cfg, n)[1]


def real_images_and_prompts(cfg: Config, n: int, at_most: bool = False) -> tuple[np.ndarray, list[str]]:
    """``n`` real images (uint8 ``[n, R, R, 3]`` at ``data.resolution``) and their captions: the
    shapes "eval" split (``eval.seed``, the captions of the shapes score), the held-out emoji, the
    first ``n`` readable items of an image folder, or for any other source the first ``n`` items
    its training batch source yields (square, no buckets). A held-out set smaller than ``n`` is an
    error naming eval.prompts, or with ``at_most`` gives all it has."""
    res = cfg.data.resolution
    if cfg.data.source == "shapes":
        from pixelrun.data.shapes import ShapesDataset, caption, render

        data = ShapesDataset(cfg.eval.seed, "eval", cfg.data.max_shapes)
        scenes = [data.scene(i) for i in range(n)]
        return np.stack([render(s, res, res) for s in scenes]), [caption(s) for s in scenes]
    if cfg.data.source == "emoji":
        from pixelrun.data.emoji import EmojiDataset

        data = EmojiDataset("eval")
        n = min(n, len(data)) if at_most else n
        if n > len(data):
            raise ConfigError("eval.prompts", f"the emoji data holds out {len(data)} images, {n} asked for "
                                              f"(lower eval.prompts)")
        items = [data.item(i, res, res) for i in range(n)]
        return torch.stack([im for im, _ in items]).permute(0, 2, 3, 1).numpy(), [c for _, c in items]
    if cfg.data.source == "folder":
        return _first_folder_items(cfg.data.path, n, res, at_most)
    square = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, buckets=False))
    return draw_real_images(make_batch_source(square), n)


def _first_folder_items(path: str, n: int, res: int, at_most: bool = False) -> tuple[np.ndarray, list[str]]:
    """The first `n` readable items of a folder (all there are, if fewer, with `at_most`)."""
    from pixelrun.data.buckets import resize_to_bucket
    from pixelrun.data.folder import ImageFolder

    folder = ImageFolder(path)
    images, captions = [], []
    for i in range(len(folder)):
        im = folder.load(i, target=(res, res))
        if im is not None:  # unreadable files are skipped, as in training
            images.append(np.asarray(resize_to_bucket(im, res, res)))
            captions.append(folder.captions[i])
            if len(images) == n:
                return np.stack(images), captions
    if not images:
        raise NoUsableData(f"no image under {path} could be loaded")
    if at_most:
        return np.stack(images), captions
    raise ConfigError("eval.prompts", f"{path} has {len(images)} readable captioned images, {n} asked for "
                                      f"(lower eval.prompts)")


def draw_real_images(source, n: int) -> tuple[np.ndarray, list[str]]:
    """The first ``n`` images (uint8) and captions a batch source yields."""
    images, captions = [], []
    while len(captions) < n:
        batch = next(source)
        images.append(batch.images.permute(0, 2, 3, 1).numpy())
        captions += batch.captions
    return np.concatenate(images)[:n], captions[:n]
