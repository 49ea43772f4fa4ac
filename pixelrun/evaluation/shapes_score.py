"""Automatic score for images generated from "shapes" captions (spec: docs/recipe.md).

It reads an image the way the renderer draws it (flat named colours on a flat background), so a
real dataset image scores 1.0 on every measure and a model's score measures how well it follows
the caption's colours, positions, kinds and sizes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from pixelrun.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    SIZES,
    ShapesDataset,
    caption,
    classify_pixels,
    parse_caption,
    render,
)

_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
PRESENT_FRACTION = 0.3


def _shape_area(kind: str, size: str, side: int) -> float:
    return _FILL[kind] * (SIZES[size] * side) ** 2


def _component(image: np.ndarray, labels: np.ndarray, ci: int, background: str) -> dict | None:
    """Largest 4-connected component of colour `ci`, with its hard pixel area and centroid
    (presence and placement, as docs/recipe.md says) and a sub-pixel area and bounding box (kind and
    size). A small shape is ~10 px across at 64 px, where whole-pixel counts misread kinds (a
    small triangle's 1-px apex rows fall below half coverage, pushing its fill ratio to ~0.64,
    the circle/triangle midpoint). So the component and its 1-px ring are read as coverage:
    each pixel's position between background and colour, clipped to [0, 1]. Area is the sum of
    coverage, width (height) the sum over columns (rows) of their largest coverage."""
    comps, n = ndimage.label(labels == ci, structure=_FOUR)
    if n == 0:
        return None
    mask = comps == np.bincount(comps.ravel())[1:].argmax() + 1
    ys, xs = np.nonzero(mask)
    win = np.s_[max(ys.min() - 1, 0) : ys.max() + 2, max(xs.min() - 1, 0) : xs.max() + 2]
    c = np.array(list(COLOURS.values())[ci], np.float32)
    b = np.array(BACKGROUNDS[background], np.float32)
    ring = ndimage.binary_dilation(mask[win], np.ones((3, 3), bool)) & np.isin(labels[win], [ci, 6, 7])
    cov = np.clip((image[win].astype(np.float32) - b) @ (c - b) / ((c - b) @ (c - b)), 0, 1) * ring
    soft_area = float(cov.sum())
    return {
        "area": len(ys),
        "cx": xs.mean() + 0.5,
        "cy": ys.mean() + 0.5,
        "soft_area": soft_area,
        "fill": soft_area / float(cov.max(0).sum() * cov.max(1).sum()),
    }


def read_shapes(image: np.ndarray, text: str) -> tuple[list[dict], bool]:
    """How each of the caption's shapes was drawn, and whether the set of present colours equals
    the set of prompted colours. One dict per shape, in the caption's order: its `shape`
    (the ShapeSpec), `drawn` (the kind its colour's component reads as, None where the colour is
    absent) and 0/1 `placed`, `kind` and `size` as :func:`score_image` defines them."""
    scene = parse_caption(text)
    h, w = image.shape[:2]
    side = min(h, w)
    labels = classify_pixels(image, scene.background)
    prompted = {s.colour: s for s in scene.shapes}
    present = {}
    for ci, colour in enumerate(COLOURS):
        comp = _component(image, labels, ci, scene.background)
        kind = prompted[colour].kind if colour in prompted else "triangle"
        if comp and comp["area"] >= PRESENT_FRACTION * _shape_area(kind, "small", side):
            present[colour] = comp
    shapes: list[dict] = []
    for s in scene.shapes:
        comp = present.get(s.colour)
        if comp is None:
            shapes.append({"shape": s, "drawn": None, "placed": 0, "kind": 0, "size": 0})
            continue
        col, row = min(int(3 * comp["cx"] / w), 2), min(int(3 * comp["cy"] / h), 2)
        got_kind = min(KINDS, key=lambda k: abs(comp["fill"] - _FILL[k]))
        got_size = min(SIZES, key=lambda z: abs(comp["soft_area"] - _shape_area(got_kind, z, side)))
        placed, kind_ok, size_ok = row * 3 + col == s.cell, got_kind == s.kind, got_size == s.size
        shapes.append(
            {"shape": s, "drawn": got_kind, "placed": int(placed), "kind": int(kind_ok), "size": int(size_ok)}
        )
    return shapes, set(present) == set(prompted)


def score_image(image: np.ndarray, text: str) -> dict:
    """Score one uint8 [H, W, 3] image against the caption it was generated from.

    Returns fractions over the caption's shapes (exact_set is 0/1 for the image):
    - placed: the shape's colour has a present largest component whose centroid lies in the
      prompted cell (cells are thirds of the image's own width and height).
    - exact_set: the set of present colours equals the set of prompted colours.
    - kind: the colour's component is present (anywhere) and its fill ratio (area / bbox area)
      is nearest that of the prompted kind (circle pi/4, square 1, triangle 1/2).
    - size: the colour's component is present and its (sub-pixel) area is nearer the prompted
      size's area than the other size's, both taken for the kind the component was *classified*
      as, so a wrong kind is not also counted as a wrong size.
    Presence: area >= 30% of a small shape of the prompted kind (d = 0.16 * shorter side). For
    colours the caption does not mention there is no kind, so the smallest one (a small
    triangle) is used: the strictest choice for exact_set.
    """
    shapes, exact = read_shapes(image, text)
    n = len(shapes)
    return {
        "placed": sum(s["placed"] for s in shapes) / n,
        "exact_set": float(exact),
        "kind": sum(s["kind"] for s in shapes) / n,
        "size": sum(s["size"] for s in shapes) / n,
    }


MEASURES = ("placed", "exact_set", "kind", "size")


def score_each(images: list[np.ndarray], captions: list[str]) -> dict[str, list[float]]:
    """Each measure for each prompt, in order (what a paired comparison of two models resamples)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scores = [score_image(im, c) for im, c in zip(images, captions)]
    return {k: [s[k] for s in scores] for k in MEASURES}


def score_images(images: list[np.ndarray], captions: list[str]) -> dict:
    """Mean of each measure over prompts ("placed" is the headline score), plus the count n."""
    each = score_each(images, captions)
    out = {k: float(np.mean(v)) if v else 0.0 for k, v in each.items()}
    out["n"] = len(images)
    return out


def real_image_sanity(n: int = 64, size: int | tuple[int, int] = 64, seed: int = 0) -> dict:
    """Score n real eval-split images at `size` (side, or (height, width)): every measure should
    be 1.0, which shows renderer and scorer agree and bounds what a perfect model can reach."""
    h, w = (size, size) if isinstance(size, int) else size
    data = ShapesDataset(seed, "eval")
    scenes = [data.scene(i) for i in range(n)]
    return score_images([render(s, h, w) for s in scenes], [caption(s) for s in scenes])
