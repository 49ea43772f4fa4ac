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
    return img.resize((w, h), Image.Resampling.LANCZOS, box=(left, top, left + cw, top + ch), reducing_gap=3.0)


def to_array(img: Image.Image) -> np.ndarray:
    """PIL image -> uint8 [H, W, 3]."""
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or uint8 [H, W, 3] array -> uint8 [3, H, W], the layout of `Batch.images`."""
    arr = to_array(img) if isinstance(img, Image.Image) else img
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy the tensor owns


def stack_images(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] arrays of one size -> one uint8 [B, 3, H, W] batch, written once, straight
    into its final memory. In a DataLoader worker that memory is shared, so handing the batch to
    the training process copies nothing more: as torch's `default_collate`
    (torch/utils/data/_utils/collate.py, `collate_tensor_fn`) does. Stacking in numpy, making the
    result contiguous and then sharing it cost three passes over fresh pages, and on a VM where a
    page fault costs microseconds that was a third of a worker's time per 512px batch."""
    h, w, c = images[0].shape
    size = (len(images), c, h, w)
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(math.prod(size))
        out = torch.empty(0, dtype=torch.uint8).new(storage).resize_(size)
    else:
        out = torch.empty(size, dtype=torch.uint8)
    view = out.numpy()  # the same memory; numpy copies from PIL's read-only arrays without a warning
    for i, im in enumerate(images):
        view[i] = im.transpose(2, 0, 1)
    return out
