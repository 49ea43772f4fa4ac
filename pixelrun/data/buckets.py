"""Aspect-ratio buckets: the image sizes a batch may have, and how an image is fitted to one.

A transformer on patches accepts any grid, but a batch must share one size. Bucketing keeps the
token count (hence compute per step and memory) nearly constant while letting wide and tall images
keep their framing instead of being centre-cropped to a square.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def aspect_buckets(
    resolution: int, patch: int, min_ratio: float = 0.5, max_ratio: float = 2.0
) -> list[tuple[int, int]]:
    """(height, width) bucket sizes in pixels, multiples of `patch`, sorted from tall to wide.

    Rule (the enumeration of Photoroom's PRX data pipeline, reimplemented): with a budget of
    N = (resolution / patch)^2 tokens and ratio r = width / height,
      * for every grid width  gw in [ceil(sqrt(N * min_ratio)),  floor(sqrt(N * max_ratio))]
        take the tallest height that fits the budget, gh = floor(N / gw);
      * for every grid height gh in [ceil(sqrt(N / max_ratio)), floor(sqrt(N / min_ratio))]
        take the widest width that fits, gw = floor(N / gh);
      * the union of both, without duplicates.
    The enumerated side is bounded by the ratio, the other side is the largest that keeps
    gh * gw <= N. Enumerating both sides matters: one pass alone misses sizes such as 12x20
    next to 12x21 (one pass gives 11 buckets at 512 px, 22 at 1024 px).

    Numbers (patch 32): 512 px -> N = 256, 13 buckets of 240..256 tokens, 11x22 .. 22x11,
    ratios exactly within [0.5, 2]. 1024 px -> N = 1024, 27 buckets of 984..1024 tokens,
    22x45 .. 45x22. Note: flooring the free side can push a ratio slightly past the bound;
    at 1024 px 22x45 and 45x22 have ratio 2.045 / 0.489 (the RECIPE's count of 27 includes them).
    """
    if resolution % patch:
        raise ValueError(f"resolution {resolution} is not a multiple of patch {patch}")
    if not 0 < min_ratio <= 1 <= max_ratio:
        raise ValueError(f"need 0 < min_ratio <= 1 <= max_ratio, got {min_ratio}, {max_ratio}")
    n = (resolution // patch) ** 2
    grids = set()
    for gw in range(math.ceil(math.sqrt(n * min_ratio)), math.floor(math.sqrt(n * max_ratio)) + 1):
        grids.add((n // gw, gw))
    for gh in range(math.ceil(math.sqrt(n / max_ratio)), math.floor(math.sqrt(n / min_ratio)) + 1):
        grids.add((gh, n // gh))
    return [(gh * patch, gw * patch) for gh, gw in sorted(grids, key=lambda g: (g[1] / g[0], g[0]))]


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space (so 1:2 and 2:1 are equally far from
    1:1), which minimises the share of the image that the centre crop throws away. Ties go to the
    bucket with more pixels, then to the first listed, so the choice is deterministic."""
    if height <= 0 or width <= 0:
        raise ValueError(f"bad image size {height}x{width}")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - target), -b[0] * b[1]))


def resize_to_bucket(img: Image.Image, h: int, w: int) -> Image.Image:
    """Scale `img` so it covers h x w with its aspect ratio kept, then centre-crop to exactly h x w.

    Done in one `resize` call with a source `box`: the crop happens in source coordinates (no
    rounding of an intermediate size), and `reducing_gap` lets PIL first shrink by an integer
    factor with a box filter (`reduce`) before the Lanczos pass; that is fast on big photos and
    still alias-free, unlike a plain bilinear resize of a large image.
    """
    W, H = img.size
    if (W, H) == (w, h):  # stored at its bucket already (shards from `pixelrun data convert`)
        return img
    scale = max(h / H, w / W)
    cw, ch = w / scale, h / scale  # source region that maps onto the bucket
    left, top = (W - cw) / 2, (H - ch) / 2
    return img.resize((w, h), Image.Resampling.LANCZOS, box=(left, top, left + cw, top + ch),
                      reducing_gap=3.0)


def to_array(img: Image.Image) -> np.ndarray:
    """PIL image -> uint8 [H, W, 3]."""
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or uint8 [H, W, 3] array -> uint8 [3, H, W], the layout of `Batch.images`."""
    arr = to_array(img) if isinstance(img, Image.Image) else img
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy the tensor owns


def stack_images(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] arrays of one size -> one uint8 [B, 3, H, W] batch."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
